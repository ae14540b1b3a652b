"""The up-to-date check (`tasks.manifest.find_up_to_date`) on a hand-made export: no conversion runs.

A local folder source and one output file are recorded in a manifest exactly as the export flow
records them; each test then changes one thing and asks whether the folder is still up to date.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from registry.models import ExportRequest, Manifest, OutputFile, ResolvedSource
from tasks.errors import KilnError
from tasks.fetch import fingerprint, model_files
from tasks.files import sha256_file
from tasks.manifest import (
    KILN_VERSION,
    MANIFEST_NAME,
    find_up_to_date,
    inputs_beyond_source,
    now_iso,
    read_manifest,
    request_key,
    write_manifest,
)


@pytest.fixture
def export(tmp_path: Path, toolchain) -> tuple[ExportRequest, Path, Path]:
    """(request, source folder, output folder) of a recorded, intact export."""
    import numpy as np
    from safetensors.numpy import save_file

    source = tmp_path / "model"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(source / "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-q8_0.gguf").write_bytes(b"GGUF" + bytes(60))
    request = ExportRequest(source=str(source), quants=["q8_0"], out_dir=str(out))
    files = fingerprint(model_files(source), source)
    gguf = out / "model-q8_0.gguf"
    manifest = Manifest(
        kiln_version=KILN_VERSION,
        request=request,
        request_key=request_key(request, files, toolchain, inputs_beyond_source(request)),
        source=ResolvedSource(kind="local", id=str(source), path=str(source), files=files),
        toolchain=toolchain,
        outputs=[OutputFile(path=gguf.name, quant="q8_0", size=gguf.stat().st_size, sha256=sha256_file(gguf))],
        checks=[],
        created_at=now_iso(),
    )
    write_manifest(out, manifest)
    return request, source, out


def test_an_intact_export_is_up_to_date(export):
    request, _, out = export
    manifest, why = find_up_to_date(request)
    assert why == "up to date"
    assert manifest == read_manifest(out)


def test_where_the_folder_lies_and_whether_checks_ran_do_not_matter(export):
    request, _, _ = export
    again = request.model_copy(update={"verify": not request.verify, "placement": "cpu"})
    assert find_up_to_date(again)[1] == "up to date"


def test_another_quant_list_is_another_export(export):
    request, _, _ = export
    assert find_up_to_date(request.model_copy(update={"quants": ["q4_k_m"]})) == (
        None, "the request differs from the last export")


def test_an_output_edited_in_place_is_caught_by_its_hash(export):
    request, _, out = export
    gguf = out / "model-q8_0.gguf"
    stat = gguf.stat()
    gguf.write_bytes(b"GGUF" + bytes(59) + b"\x01")  # same size
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime: only the hash can tell
    assert find_up_to_date(request) == (None, "model-q8_0.gguf does not match its recorded sha256")


def test_a_missing_or_resized_output_is_named(export):
    request, _, out = export
    gguf = out / "model-q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert find_up_to_date(request)[1] == "model-q8_0.gguf has size 4, manifest says 64"
    gguf.unlink()
    assert find_up_to_date(request)[1] == "model-q8_0.gguf is missing"


def test_a_changed_source_file_means_export_again(export):
    request, source, _ = export
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(source / "model.safetensors"))
    assert find_up_to_date(request) == (None, "the source, the toolchain or Kiln's writer changed")


def test_a_source_file_gone_means_export_again(export):
    request, source, _ = export
    (source / "model.safetensors").unlink()
    assert find_up_to_date(request)[0] is None


def test_no_manifest_or_a_damaged_one_is_not_up_to_date(export):
    request, _, out = export
    (out / MANIFEST_NAME).write_text("{ not json")
    assert find_up_to_date(request) == (None, "no manifest yet")
    (out / MANIFEST_NAME).unlink()
    assert find_up_to_date(request) == (None, "no manifest yet")


def test_a_manifest_naming_a_file_outside_its_folder_is_refused(export):
    request, _, out = export
    data = json.loads((out / MANIFEST_NAME).read_text())
    data["outputs"][0]["path"] = "../../etc/passwd"
    (out / MANIFEST_NAME).write_text(json.dumps(data))
    with pytest.raises(KilnError, match="escapes its folder"):
        find_up_to_date(request)


def test_an_export_by_an_older_writer_is_out_of_date(export, monkeypatch):
    """Kiln writing other bytes for the same inputs (the GGUF's model name, say) makes older exports stale."""
    request, _, _ = export
    assert find_up_to_date(request)[1] == "up to date"
    monkeypatch.setattr("tasks.manifest.WRITER_GENERATION", 3)
    assert find_up_to_date(request) == (None, "the source, the toolchain or Kiln's writer changed")
