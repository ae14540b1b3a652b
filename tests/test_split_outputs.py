"""`--split-max-size`: outputs split into shards by llama.cpp's own gguf-split, through the `kiln` executable.

The demo model (f16 ~270 MB, Q8_0 ~145 MB, Q4_K_M ~105 MB; its largest tensor, the tied
49152 x 576 embedding, 56.6 MB in f16) at 120M: f16 and Q8_0 are split, Q4_K_M stays whole and
keeps the only Modelfile. The shards must hold the very tensors of the cached whole file and
load back in llama.cpp given the first one. Also here: the refusals before Prefect, and
preflight's memory check for a prebuilt GGUF source.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
from pathlib import Path

import pytest

from tasks.files import sha256_file
from tests.support.kiln_cli import reached_prefect, run_kiln

SPLIT = "120M"
SHARD = re.compile(r"smollm2-135m-instruct-(f16|q8_0)-(\d{5})-of-(\d{5})\.gguf")


@pytest.fixture(scope="module")
def llama_tools() -> None:
    """llama.cpp's tools, as `kiln setup` builds them (once per environment; a no-op when built)."""
    from tasks.llama_tools import build_llama_tools

    build_llama_tools()


@pytest.fixture(scope="module")
def split_export(tmp_path_factory: pytest.TempPathFactory, llama_tools) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("split") / "out"
    # Checks off: verify and the report run before placement, on the whole cached files, either way.
    proc = run_kiln("demo", "--out", str(out), "--split-max-size", SPLIT, "--no-verify", "--no-report", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout), proc.stderr


def _tensors(path: Path) -> list[tuple[str, bytes]]:
    """Each tensor's name and data bytes, in file order."""
    from tasks.gguf_file import read_layout

    layout = read_layout(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return [(t.name, data[layout.data_offset + t.offset: layout.data_offset + t.offset + t.nbytes])
                for t in layout.tensors]


def test_outputs_over_the_size_are_split_and_recorded_shard_by_shard(split_export):
    out, manifest, _ = split_export
    ggufs = [o for o in manifest["outputs"] if o["path"].endswith(".gguf")]
    by_quant: dict[str, list[dict]] = {}
    for record in ggufs:
        by_quant.setdefault(record["quant"], []).append(record)
        path = out / record["path"]
        assert path.stat().st_size == record["size"] and sha256_file(path) == record["sha256"]
    assert [r["path"] for r in by_quant["q4_k_m"]] == ["smollm2-135m-instruct-q4_k_m.gguf"]
    assert by_quant["q4_k_m"][0]["shard"] is None
    for quant in ("f16", "q8_0"):
        shards = by_quant[quant]
        assert len(shards) >= 2
        for i, record in enumerate(shards, start=1):
            assert record["path"] == f"smollm2-135m-instruct-{quant}-{i:05d}-of-{len(shards):05d}.gguf"
            assert (record["shard"], record["shards"]) == (i, len(shards))
        assert not (out / f"smollm2-135m-instruct-{quant}.gguf").exists()
    # gguf-split's limit is on each shard's tensor data (the first shard also carries the metadata).
    from tasks.gguf_file import read_layout

    for record in ggufs:
        if record["shard"]:
            assert sum(-(-t.nbytes // 32) * 32 for t in read_layout(out / record["path"]).tensors) <= 120_000_000
    assert not list(out.glob(".kiln-tmp-*"))


def test_shards_hold_the_whole_files_tensors(split_export, demo_f16_gguf):
    out, manifest, _ = split_export
    shards = [out / o["path"] for o in manifest["outputs"] if o["quant"] == "f16" and o["path"].endswith(".gguf")]
    joined = [t for shard in shards for t in _tensors(shard)]
    assert joined == _tensors(demo_f16_gguf)


def test_llama_cpp_loads_the_model_from_its_first_shard(split_export):
    """Greedy decoding of the f16 model given its first shard, prompted as Ollama renders the exported TEMPLATE."""
    from llama_cpp import Llama

    from tasks.modelfile import parse_modelfile
    from tasks.template_check import ChatMessage, render_go_template

    out, _, _ = split_export
    modelfile = parse_modelfile((out / "smollm2-135m-instruct-q4_k_m.Modelfile").read_text())
    prompt = render_go_template(modelfile.template, [ChatMessage(role="user", content="What is the capital of France?")])
    first = sorted(out.glob("smollm2-135m-instruct-f16-00001-of-*.gguf"))[0]
    llm = Llama(model_path=str(first), n_ctx=512, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        answer = llm.create_completion(tokens, max_tokens=32, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    assert "Paris" in answer


def test_only_whole_outputs_get_modelfiles_and_the_user_is_told(split_export):
    out, manifest, stderr = split_export
    assert [m["quant"] for m in manifest["ollama"]["models"]] == ["q4_k_m"]
    assert sorted(p.name for p in out.glob("*.Modelfile")) == ["smollm2-135m-instruct-q4_k_m.Modelfile"]
    assert any("Ollama cannot import split GGUFs" in w for w in manifest["ollama"]["warnings"])
    check = next(c for c in manifest["checks"] if c["name"] == "split outputs")
    assert "f16 in 3 shards" in check["detail"] and "q8_0 in 2 shards" in check["detail"]
    assert "Ollama cannot import split GGUFs" in " ".join(stderr.split())


def test_split_export_rerun_is_up_to_date(split_export):
    out, _, _ = split_export
    proc = run_kiln("demo", "--out", str(out), "--split-max-size", SPLIT, "--no-verify", "--no-report")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "up to date" in proc.stderr and not reached_prefect(proc.stderr)


def test_export_again_without_a_split_puts_whole_files_back(split_export, tmp_path):
    out, _, _ = split_export
    again = tmp_path / "again"
    shutil.copytree(out, again, copy_function=os.link)
    proc = run_kiln("demo", "--out", str(again), "--no-verify", "--no-report", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads(proc.stdout)
    assert not [p.name for p in again.iterdir() if SHARD.fullmatch(p.name)]
    assert all(o["shard"] is None for o in manifest["outputs"])
    assert sorted(m["quant"] for m in manifest["ollama"]["models"]) == ["f16", "q4_k_m", "q8_0"]


@pytest.mark.parametrize(("size", "words"), [
    ("0M", ["'0M'", "whole number of megabytes or gigabytes above zero", "500M or 2G"]),
    ("500MB", ["'500MB'", "500M or 2G"]),
    ("1.5G", ["'1.5G'", "500M or 2G"]),
    ("10M", ["10M is smaller than the largest tensor", "576 x 49152", "give at least 57M"]),
])
def test_bad_split_size_refused_before_prefect(size, words, tmp_path):
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--out", str(out), "--split-max-size", size, timeout=300)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]  # (a fresh cache first builds the demo model, with progress)
    assert message.startswith("error:") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in message, message
    assert not reached_prefect(proc.stderr) and not out.exists()


def test_split_with_ollama_name_refused_before_prefect(tmp_path):
    out = tmp_path / "out"
    proc = run_kiln("export", "demo", "--out", str(out), "--split-max-size", "2G", "--ollama-name", "smol")
    message = " ".join(proc.stderr.split())
    assert proc.returncode != 0 and "Ollama cannot import split GGUFs" in message, message
    assert not reached_prefect(proc.stderr) and not out.exists()


def test_prebuilt_gguf_over_the_memory_budget_refused_with_the_numbers(demo_f16_gguf, tmp_path):
    """A prebuilt f16 GGUF: verify and the report run the file itself, so its size governs the estimate."""
    source = tmp_path / "smol-f16.gguf"
    os.link(demo_f16_gguf, source) if source.parent.stat().st_dev == demo_f16_gguf.stat().st_dev \
        else shutil.copyfile(demo_f16_gguf, source)
    out = tmp_path / "out"
    proc = run_kiln("export", str(source), "--quant", "q8_0", "--out", str(out), "--memory-budget", "200MB",
                    timeout=300)
    message = " ".join(proc.stderr.split())
    assert proc.returncode != 0, message
    assert re.search(r"needs about [0-9.]+ GB of memory at its peak \((verify|report)", message), message
    assert "memory budget of 0.20 GB" in message and "--no-verify" in message, message
    assert not reached_prefect(proc.stderr) and not out.exists()


def test_prebuilt_gguf_memory_estimate_covers_the_file(demo_f16_gguf):
    from tasks.memory import gguf_source_memory

    estimate = gguf_source_memory(demo_f16_gguf, requantizes=True, verify=True, report=True)
    size = demo_f16_gguf.stat().st_size
    assert set(estimate.steps) == {"quantize", "verify", "report"}
    assert estimate.steps["verify"] > size and estimate.steps["report"] > size  # they map the whole file
    assert estimate.steps["quantize"] < estimate.steps["verify"]  # a tensor at a time, not the file


def test_outputs_step_refuses_a_size_below_a_files_largest_tensor_before_splitting_any(demo_f16_gguf, tmp_path,
                                                                                         llama_tools):
    """The guard at place time, from the file's own tensor table (preflight's check estimates from config.json)."""
    from tasks.outputs import split_outputs
    from tasks.split import SplitSizeInvalid

    out = tmp_path / "out"
    out.mkdir()
    os.link(demo_f16_gguf, out / "m-f16.gguf") if out.stat().st_dev == demo_f16_gguf.stat().st_dev \
        else shutil.copyfile(demo_f16_gguf, out / "m-f16.gguf")
    with pytest.raises(SplitSizeInvalid, match=r"50M is smaller than the largest tensor \(token_embd.weight of "
                                               r"m-f16.gguf, 56.6 MB\).*give at least 57M"):
        split_outputs.fn(out, {"f16": "m-f16.gguf"}, "50M")
    assert sorted(p.name for p in out.iterdir()) == ["m-f16.gguf"]


def test_disk_estimate_counts_the_shards():
    from registry.models import ExportRequest
    from tasks.preflight import estimate_bytes

    plain = ExportRequest(quants=["q8_0", "q4_k_m"])
    params = 1_000_000_000
    # f16 2 GB, q8_0 1.06 GB, q4_k_m 0.61 GB: at 1G the first two are split, a copy of each beside the cache.
    extra = estimate_bytes(params, plain.model_copy(update={"split_max_size": "1G"}), False) - \
        estimate_bytes(params, plain, False)
    assert 3.0e9 < extra < 3.5e9
    assert estimate_bytes(params, plain.model_copy(update={"split_max_size": "5G"}), False) == \
        estimate_bytes(params, plain, False)


def test_report_on_a_split_export_made_without_one_says_how_to_get_it(split_export):
    out, _, _ = split_export
    proc = run_kiln("report", str(out))
    message = " ".join(proc.stderr.split())
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "are split (--split-max-size)" in message and "without --no-report" in message, message
