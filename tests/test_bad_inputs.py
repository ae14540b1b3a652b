"""Bad inputs: one test a row of docs/bad-inputs.md.

Every refusal is one message that names the field (or file) and the fix, raised before any
heavy work, and nothing is left under a final name. CLI rows run the real `kiln` and check
the refusal came before Prefect started. Rows that tests/test_preflight.py, tests/test_fetch.py,
tests/test_registry.py or tests/faults/ already cover are referenced in the table, not repeated
here; `test_the_table_has_a_test_for_every_row` keeps the table and the tests in step.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError

from registry import BASES_DIR, format_validation_error, load_spec_file
from registry.models import ExportRequest
from tasks.errors import KilnError, SourceInvalid, SpecInvalid
from tests.support.kiln_cli import reached_prefect, run_kiln
from tests.support.prefect_server import logs_once

REPO = Path(__file__).resolve().parent.parent
TABLE = REPO / "docs" / "bad-inputs.md"
SHA = "0123456789abcdef0123456789abcdef01234567"


# ------------------------------------------------------------------ the command line

CLI_ROWS = {
    "B01": (["export", "demo", "--name", "../x"], ["name:", "must be a plain name", "no '/'", "'../x'"]),
    "B02": (["export", "demo", "--name", "/etc/x"], ["name:", "must be a plain name", "'/etc/x'"]),
    "B03": (["export", "demo", "--quant", "q4 k m"], ["quants:", "'q4 k m' is not a quant type name", "letters, digits, _"]),
    "B04": (["export", "demo", "--quant", "iq2_xxs"], ["iq2_xxs", "need an importance matrix", "pick q2_k, q3_k_m"]),
    "B05": (["export", "demo", "--outtype", "q8_0"], ["'--outtype'", "'q8_0' is not one of 'f16', 'bf16', 'f32'"]),
    "B06": (["export", "demo", "--ollama-name", "a/b/c/d"], ["ollama_name:", "'a/b/c/d'", "may contain only"]),
    "B07": (["export", "demo", "--ollama-name", "model:"], ["ollama_name:", "the tag after ':' is empty"]),
    "B08": (["export", "demo", "--ollama-name", "m" * 90], ["ollama_name:", "is 90 characters", "allows 1 to 80"]),
    "B09": (["export", f"hf:OrgOnly@{SHA}"], ["the repo id must be ORG/NAME"]),
    "B10": (["export", f"hf:org/../x@{SHA}"], ["hf:org/../x", "the repo id must be ORG/NAME"]),
    "B11": (["export", "hf:Org/Name@abc1234"], ["'abc1234' is a branch or tag", "40-character commit SHA",
                                                "--resolve-revision"]),
    "B12": (["export", "{readme}"], ["a file source must be a .gguf file", "pass its folder"]),
    "B13": (["export", ""], ["source:", "source is empty", "give a value"]),
    "B14": (["export", "llama-3.2-1b-instruct"], ["llama-3.2-1b-instruct", "must be accepted", "--accept-license"]),
    "B15": (["export", "demo", "--out", "/proc/kiln-out"], ["output folder /proc/kiln-out is not writable",
                                                            "choose another --out"]),
    "B16": (["export", "demo", "--quants", "q8_0"], ["No such option '--quants'", "'--quant'"]),
    "B17": (["export", "demo", "--max-kl", "-1"], ["max_kl:", "greater than 0", "(got -1.0)"]),
    "B18": (["register", "{empty}"], ["holds no Kiln export", "manifest.json"]),
    "B20": (["export", "~nosuchuser-kiln/model"], ["~nosuchuser-kiln/model: no such folder or file",
                                                   "no home folder for '~nosuchuser-kiln'"]),
}


@pytest.mark.parametrize("row", sorted(CLI_ROWS))
def test_cli_refusal(row, tmp_path):
    args, words = CLI_ROWS[row]
    readme = tmp_path / "README.md"
    readme.write_text("not a model\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(readme=readme, empty=empty) for a in args]
    out = tmp_path / "out"
    if args[0] == "export" and "--out" not in args:
        args += ["--out", str(out)]
    proc = run_kiln(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert not reached_prefect(proc.stderr)  # refused before Prefect started
    refusals = [line for line in proc.stderr.splitlines() if line.lower().startswith("error")]
    assert len(refusals) == 1, proc.stderr  # one message
    assert not out.exists()  # nothing written, not even an empty output folder
    assert list(empty.iterdir()) == []


# ------------------------------------------------------------------ deployment parameters (ExportRequest)

REQUEST_ROWS = {
    "R01": ({"quant": ["q8_0"]}, ["quant: unknown field", "did you mean `quants`?"]),
    "R02": ({"quants": "q4_k_m"}, ["quants: Input should be a valid list", "(got 'q4_k_m')"]),
    "R03": ({"verify": "maybe"}, ["verify: Input should be a valid boolean", "(got 'maybe')"]),
    "R04": ({"outtype": "int8"}, ["outtype: Input should be 'f16', 'bf16' or 'f32'", "(got 'int8')"]),
    "R05": ({"placement": "tpu"}, ["placement: Input should be 'local', 'cpu' or 'gpu'", "(got 'tpu')"]),
    "R06": ({"out_dir": ""}, ["out_dir: Value error, out_dir is empty", "give a value"]),
    "R07": ({"out_dir": "kiln\x00out"}, ["out_dir: Value error, out_dir contains the control character '\\x00'",
                                         "remove it"]),
    "R08": ({"quants": ["q8_0", 4]}, ["quants.1: Input should be a valid string", "(got 4)"]),
    "R09": ({"name": "a/b"}, ["name: must be a plain name", "(got 'a/b')"]),
    "R10": ({"ollama_name": "Bad Name"}, ["ollama_name:", "contains ' '", "may contain only"]),
    "R11": ({"adapter_mode": "fuse"}, ["adapter_mode: Input should be 'merge', 'adapter' or 'peft'", "(got 'fuse')"]),
    "R12": ({"source": "demo", "outtype": "f16", "sauce": "demo"}, ["sauce: unknown field", "did you mean `source`?",
                                                                     "Allowed fields:"]),
}


@pytest.mark.parametrize("row", sorted(REQUEST_ROWS))
def test_request_refusal(row):
    fields, words = REQUEST_ROWS[row]
    with pytest.raises(ValidationError) as info:
        ExportRequest(**fields)
    message = format_validation_error(info.value)
    for word in words:
        assert word in message, (word, message)
    assert "\n" not in message


# ------------------------------------------------------------------ registry entries (BaseModelSpec YAML)

GOOD_YAML = (BASES_DIR / "smollm2-135m-instruct.yaml").read_text(encoding="utf-8")
REVISION_LINE = 'revision: "12fd25f77366fa6b3b4b768ec3050bf629380bac"'


def _swap(old: str, new: str) -> str:
    assert old in GOOD_YAML
    return GOOD_YAML.replace(old, new, 1)


REGISTRY_ROWS = {
    "Y01": (_swap(REVISION_LINE, REVISION_LINE.replace("revision", "revison")),
            ["revison: unknown field", "did you mean `revision`?", "revision: Field required"]),
    "Y02": (_swap("params: 134515008", "params: lots"), ["params: Input should be a valid integer", "(got 'lots')"]),
    "Y03": (GOOD_YAML + 'revision: "ffffffffffffffffffffffffffffffffffffffff"\n',
            ["not valid YAML", "found the key 'revision' twice"]),
    "Y04": (GOOD_YAML.encode("utf-8") + b"license_url: caf\xe9\n", ["not UTF-8 text", "save the registry entry as UTF-8"]),
    "Y05": (_swap("params: 134515008", "params: !!python/object/apply:os.system ['touch {marker}']"),
            ["not valid YAML", "python/object/apply:os.system"]),
    "Y06": ("", ["expected a mapping of BaseModelSpec fields, got NoneType"]),
    "Y07": (_swap("hf_id: HuggingFaceTB/SmolLM2-135M-Instruct", "hf_id: HuggingFaceTB/.."),
            ["hf_id: Value error", "'..' is not a Hub name", "no '--' or '..'"]),
    "Y08": ("key: " + "[" * 5000 + "]" * 5000 + "\n", ["not valid YAML", "nested too deeply"]),
    "Y09": (_swap("params: 134515008", "params: -5"), ["params: Input should be greater than 0", "(got -5)"]),
    "Y10": (_swap("template: chatml", "template: chatml2"), ["template: Input should be 'chatml'", "(got 'chatml2')"]),
    "Y11": (_swap(REVISION_LINE, "revision: v1.0"), ["revision: Value error",
                                                     "revision must be a 40-char lowercase hex SHA", "'v1.0'"]),
    "Y12": (_swap("target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]",
                  "target_modules: []"), ["target_modules: List should have at least 1 item"]),
}


@pytest.mark.parametrize("row", sorted(REGISTRY_ROWS))
def test_registry_entry_refusal(row, tmp_path):
    text, words = REGISTRY_ROWS[row]
    marker = tmp_path / "code-ran"
    path = tmp_path / "smollm2-135m-instruct.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text.replace("{marker}", str(marker)), encoding="utf-8")
    with pytest.raises(SpecInvalid) as info:
        load_spec_file(path)
    message = str(info.value)
    assert message.startswith(str(path))  # names the file
    for word in words:
        assert word in message, (word, message)
    assert not marker.exists()


def test_the_registry_as_shipped_still_loads():
    for path in sorted(BASES_DIR.glob("*.yaml")):
        load_spec_file(path)


# ------------------------------------------------------------------ the batch catalogue (flows/batch.py)

CATALOGUE_ROWS = {
    "K01": ("base:\n  - source: demo\n", ["field `base`", "Extra inputs are not permitted"]),
    "K02": ("bases:\n  - source: demo\n    adapters:\n      - name: ../evil\n        path: /tmp/a\n",
            ["adapters[0]", "field `name`", "String should match pattern"]),
    "K03": ("bases:\n  - source: demo\n    options: {nmae: x}\n", ["item 'smollm2-135m-instruct'", "field `nmae`"]),
    "K04": ("bases:\n  - source: demo\n    quants: q4_k_m\n", ["bases[0] (demo)", "field `quants`",
                                                               "Input should be a valid list"]),
    "K05": ("bases:\n  - source: demo\n  - source: demo\n", ["field `name`", "the same item name as bases[0]",
                                                             "give the base or adapter another `name`"]),
    "K06": ("bases: []\n", ["field `bases`", "at least 1 item"]),
    "K07": ("bases:\n  - source: demo\n    quants: [q9_z]\n", ["item 'smollm2-135m-instruct' (bases[0])",
                                                               "unknown quant type(s) q9_z"]),
    "K08": ("- demo\n", ["expected a mapping with `bases:`, found list"]),
}


@pytest.mark.parametrize("row", sorted(CATALOGUE_ROWS))
def test_catalogue_refusal(row, tmp_path):
    from flows import batch

    text, words = CATALOGUE_ROWS[row]
    path = tmp_path / "catalogue.yaml"
    path.write_text(text, encoding="utf-8")
    out_root = tmp_path / "batch-out"
    with pytest.raises(SpecInvalid) as info:
        batch.load_catalogue(path, out_root=str(out_root))
    message = str(info.value)
    assert message.startswith(f"catalogue {path}")
    for word in words:
        assert word in message, (word, message)
    assert not any(p.is_file() for p in out_root.rglob("*")) if out_root.exists() else True


def test_catalogue_refusal_K09_not_utf8(tmp_path):
    from flows import batch

    path = tmp_path / "catalogue.yaml"
    path.write_bytes(b"bases:\n  - source: demo\n    name: caf\xe9\n")
    with pytest.raises(KilnError, match="UTF-8"):
        batch.load_catalogue(path, out_root=str(tmp_path / "batch-out"))


# ------------------------------------------------------------------ model folders (refused in preflight)


def _metadata_refusal(folder: Path):
    from tasks.fetch import locate_metadata, parse_source

    return locate_metadata(parse_source(str(folder)))


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


MODEL_ROWS = {
    "M01": ({}, SourceInvalid, ["has no config.json", "Point SOURCE at the folder that holds config.json"]),
    "M02": ({"config.json": b"[1, 2]"}, SourceInvalid, ["config.json must hold a JSON object"]),
    "M03": ({"config.json": b"{\"architectures\": [\"LlamaForCausalLM\"], \"name\": \"caf\xe9\"}"}, SourceInvalid,
            ["config.json is not valid JSON", "re-download or fix it"]),
}


@pytest.mark.parametrize("row", sorted(MODEL_ROWS))
def test_model_folder_refusal(row, tmp_path):
    files, error, words = MODEL_ROWS[row]
    folder = _write(tmp_path / "model", files)
    with pytest.raises(error) as info:
        _metadata_refusal(folder)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_model_folder_refusal_M04_no_architectures(tmp_path, demo_model_dir, toolchain):
    """Refused by preflight, before the converter is asked anything."""
    from tasks.fetch import parse_source
    from tasks.preflight import run_preflight

    folder = tmp_path / "model"
    shutil.copytree(demo_model_dir, folder, copy_function=lambda s, d: Path(d).hardlink_to(s))
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    request = ExportRequest(source=str(folder), out_dir=str(tmp_path / "out"))
    with pytest.raises(SourceInvalid, match=r"config.json has no `architectures` list, so the converter cannot pick"):
        run_preflight(parse_source(str(folder)), folder, request, toolchain)


def test_model_folder_refusal_M05_no_tokenizer(tmp_path, demo_model_dir, toolchain):
    """No tokenizer files: the converter's own probe refuses, and its reason is passed on (see the table)."""
    from tasks.errors import ConversionFailed
    from tasks.fetch import parse_source
    from tasks.preflight import run_preflight

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(demo_model_dir / "config.json", folder / "config.json")
    (folder / "model.safetensors").hardlink_to(demo_model_dir / "model.safetensors")
    request = ExportRequest(source=str(folder), out_dir=str(tmp_path / "out"))
    with pytest.raises(ConversionFailed, match="tokenizer") as info:
        run_preflight(parse_source(str(folder)), folder, request, toolchain)
    assert "Traceback" not in str(info.value)


def test_output_name_refusal_B19_safe_child():
    """Every output name is put under its folder through safe_child: one that climbs out is refused."""
    from tasks.errors import OutputDirInvalid
    from tasks.files import safe_child

    for name in ("../x.gguf", "/etc/passwd", "a/../../b"):
        with pytest.raises(OutputDirInvalid, match="escapes its folder"):
            safe_child(Path("/tmp/kiln-out"), name)


# ------------------------------------------------------------------ an export folder handed to `kiln register`


def _export_folder(folder: Path, modelfile: str) -> Path:
    """A folder with a valid manifest whose Ollama plan names `modelfile` (and a GGUF that is there)."""
    from registry.models import Manifest, OllamaModel, OllamaPlan, ResolvedSource
    from tasks.toolchain import Toolchain

    folder.mkdir()
    (folder / "m-q8_0.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    manifest = Manifest(
        kiln_version="0.1.0", request=ExportRequest(out_dir=str(folder)), request_key="0" * 64,
        source=ResolvedSource(kind="demo", id="demo", path=str(folder)),
        toolchain=Toolchain(llama_cpp_python="0", converter_source="-", converter_dir="-", converter_sha256="0" * 64,
                            gguf_py_version="0"),
        outputs=[], checks=[], created_at="2026-01-01T00:00:00+00:00",
        ollama=OllamaPlan(dialect="chatml", verified=True, system=None, stops=[], models=[
            OllamaModel(quant="q8_0", gguf="m-q8_0.gguf", modelfile=modelfile, name="kiln-bad:q8_0")]),
    )
    (folder / "manifest.json").write_text(manifest.model_dump_json(), encoding="utf-8")
    return folder


def test_register_refusal_B21_manifest_path_escapes(tmp_path):
    """A manifest edited to point outside its folder: refused before anything is read or sent."""
    folder = _export_folder(tmp_path / "export", "../../../etc/hostname")
    proc = run_kiln("register", str(folder), env={"OLLAMA_HOST": "http://127.0.0.1:9"}, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: path '../../../etc/hostname' escapes its folder" in proc.stderr
    assert "use a plain relative name" in proc.stderr and "Traceback" not in proc.stderr


def test_register_refusal_B22_modelfile_missing(tmp_path):
    folder = _export_folder(tmp_path / "export", "m-q8_0.Modelfile")
    proc = run_kiln("register", str(folder), env={"OLLAMA_HOST": "http://127.0.0.1:9"}, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "m-q8_0.Modelfile" in proc.stderr


# ------------------------------------------------------------------ files that are not whole; prebuilt GGUFs (issue 13)


def _refused_before_prefect(proc, out: Path, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and not reached_prefect(proc.stderr)
    assert len([line for line in proc.stderr.splitlines() if line.lower().startswith("error")]) == 1, proc.stderr
    assert not out.exists()  # not even an empty output folder


def test_cli_refusal_F01_truncated_gguf(demo_f16_gguf, tmp_path):
    """Was: libllama's "data is not within the file bounds", 15 s into quantization."""
    cut = tmp_path / "cut.gguf"
    with open(demo_f16_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(100_000_000))
    out = tmp_path / "out"
    proc = run_kiln("export", str(cut), "--out", str(out), timeout=120)
    _refused_before_prefect(proc, out, "cut.gguf: truncated: its tensor table describes",
                            "but the file has 100000000", "download or convert it again")


def test_cli_refusal_F02_truncated_safetensors(demo_model_dir, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for path in demo_model_dir.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            (folder / path.name).hardlink_to(path)
    with open(demo_model_dir / "model.safetensors", "rb") as src, open(folder / "model.safetensors", "wb") as dst:
        dst.write(src.read(100_000_000))
    out = tmp_path / "out"
    proc = run_kiln("export", str(folder), "--out", str(out), timeout=120)
    _refused_before_prefect(proc, out, "model.safetensors: truncated: its header describes",
                            "but the file has 100000000", "download again")


def _q4_k_m_gguf(demo_export) -> Path:
    return demo_export[0] / "smollm2-135m-instruct-q4_k_m.gguf"


def test_cli_refusal_F03_only_types_with_more_bits_than_the_gguf(demo_export, tmp_path):
    out = tmp_path / "out"
    proc = run_kiln("export", str(_q4_k_m_gguf(demo_export)), "--quant", "q8_0", "--out", str(out), timeout=120)
    _refused_before_prefect(proc, out, "is already q4_k_m, so none of the requested types is made",
                            "q8_0 would have more bits than the source", "Pass --quant q4_k_m")


def test_cli_refusal_F04_quant_auto_on_a_quantized_gguf(demo_export, tmp_path):
    out = tmp_path / "out"
    proc = run_kiln("export", str(_q4_k_m_gguf(demo_export)), "--quant", "auto", "--max-size", "500MB",
                    "--out", str(out), timeout=120)
    _refused_before_prefect(proc, out, "is already q4_k_m: --quant auto measures its candidates against a float GGUF")


def _without_chat_template(demo_model_dir: Path, folder: Path) -> Path:
    """The demo folder with its chat template taken out (a base model's folder looks like this)."""
    folder.mkdir()
    for path in demo_model_dir.iterdir():
        if path.is_file() and path.name not in ("chat_template.jinja", "tokenizer_config.json"):
            (folder / path.name).hardlink_to(path)
    config = json.loads((demo_model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_cli_refusal_F06_hf_folder_without_a_chat_template(demo_model_dir, tmp_path):
    """Was: converted and quantized, then failed in verify (transformers has no template to prompt with)."""
    folder = _without_chat_template(demo_model_dir, tmp_path / "no-template")
    out = tmp_path / "out"
    proc = run_kiln("export", str(folder), "--out", str(out), timeout=120)
    _refused_before_prefect(proc, out, "no-template has no chat template", "pass --dialect NAME", "chatml",
                            "tokenizer_config.json", "chat_template.jinja", "--no-verify")


def test_F06_the_fixes_it_names_work(demo_model_dir, tmp_path):
    """Both ways out the refusal names, as typed: --dialect (verified through the dialect on both sides,
    transformers included) and --no-verify (GGUF files only). Same folder name and files: one conversion."""
    folder = _without_chat_template(demo_model_dir, tmp_path / "no-template")
    out = tmp_path / "with-dialect"
    proc = run_kiln("export", str(folder), "--dialect", "chatml", "--quant", "q8_0", "--no-report",
                    "--out", str(out), "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = {(c["name"], c["target"]): c for c in json.loads(proc.stdout)["checks"]}
    assert checks[("tokenization matches transformers", "f16")]["passed"], checks
    assert checks[("top-1 agreement with transformers", "f16")]["passed"], checks
    assert len(list(out.glob("*.Modelfile"))) == 2  # f16 and q8_0, each with the dialect's TEMPLATE

    out = tmp_path / "unverified"
    proc = run_kiln("export", str(folder), "--no-verify", "--quant", "q8_0", "--no-report",
                    "--out", str(out), "--json", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = {(c["name"], c["target"]): c for c in json.loads(proc.stdout)["checks"]}
    chat = checks[("chat template", "source")]["detail"]
    assert chat == "no chat template and no --dialect: GGUF files only, no Modelfile", chat
    assert sorted(p.name for p in out.glob("*.gguf")) == ["no-template-f16.gguf", "no-template-q8_0.gguf"]
    assert not list(out.glob("*.Modelfile"))


def test_flow_refusal_F05_leaves_no_output_folder(prefect_server, tmp_path):
    """A refusal inside the `export` flow (a deployment run: no CLI preflight before it) leaves no folder:
    the export lock lives in the cache, and the folder is made when the first output is placed."""
    out = tmp_path / "out"
    run_id = prefect_server.run_deployment("export/export", {"request": {
        "source": "demo", "quants": ["q9_z"], "out_dir": str(out), "placement": "local"}})
    run = prefect_server.wait(run_id, timeout=300)
    assert run["state"]["type"] == "FAILED", prefect_server.logs(run_id) + prefect_server.diagnostics()
    assert "unknown quant type(s) q9_z" in logs_once(prefect_server, run_id, "unknown quant type(s) q9_z")
    assert not out.exists()


# ------------------------------------------------------------------ the table


ROW_RE = re.compile(r"^\|\s*([A-Z]\d\d)\s*\|.*\|\s*`?([^|`]+?)`?\s*\|\s*$")


def table_rows() -> dict[str, str]:
    rows = {}
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if match := ROW_RE.match(line):
            rows[match.group(1)] = match.group(2).strip()
    return rows


def test_the_table_has_a_test_for_every_row():
    rows = table_rows()
    assert len(rows) >= 30, len(rows)
    here = Path(__file__).read_text(encoding="utf-8")
    for row_id, test_ref in rows.items():
        file_part, _, name = test_ref.partition("::")
        path = REPO / file_part
        assert path.is_file(), (row_id, test_ref)
        function = name.split("[", 1)[0]
        assert re.search(rf"def {re.escape(function)}\(", path.read_text(encoding="utf-8")), (row_id, test_ref)
        if path == Path(__file__).resolve():
            parametrized = {**CLI_ROWS, **REQUEST_ROWS, **REGISTRY_ROWS, **CATALOGUE_ROWS, **MODEL_ROWS}
            assert row_id in parametrized or row_id in function or row_id in here, (row_id, test_ref)
    new_rows = [r for r, ref in rows.items() if ref.startswith("tests/test_bad_inputs.py")]
    assert len(new_rows) >= 30, len(new_rows)
