"""Security: tokens stay out of everything written, no shell, no remote code or pickles unless allowed.

Paths from a model repo, a catalogue or a parameter are refused when they leave their folder:
those rows are in docs/bad-inputs.md (tests/test_bad_inputs.py, tests/test_fetch.py).
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import pytest

from tests.faults.helpers import TOKEN_MARKER

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = [p for d in ("flows", "tasks", "registry", "bench") for p in sorted((REPO / d).rglob("*.py"))]


def files_holding(marker: bytes, *roots: Path) -> list[str]:
    hits = []
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    if marker in fh.read():
                        hits.append(str(path))
    return hits


def test_the_hub_token_reaches_no_output_manifest_log_or_prefect_record(reference_export, prefect_api):
    """The reference export ran with HF_TOKEN and HUGGING_FACE_HUB_TOKEN set to a marker."""
    run = reference_export.run
    assert run.proc.returncode == 0
    assert TOKEN_MARKER not in run.stdout and TOKEN_MARKER not in run.stderr
    assert TOKEN_MARKER not in json.dumps(reference_export.manifest)
    marker = TOKEN_MARKER.encode()
    # Every output (GGUF metadata included), the manifest, the Prefect server's database and logs
    # (flow run parameters, task logs, artifacts), and the client's result storage.
    assert files_holding(marker, reference_export.out, prefect_api.home, reference_export.prefect_home) == []


def _subprocess_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = ast.unparse(func)
            if name.startswith("subprocess.") or name in ("os.system", "os.popen", "Popen"):
                yield name, node


def test_subprocesses_take_argument_lists_never_a_shell():
    problems, seen = [], 0
    for path in PRODUCTION:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, call in _subprocess_calls(tree):
            seen += 1
            where = f"{path.relative_to(REPO)}:{call.lineno}"
            if name in ("os.system", "os.popen"):
                problems.append(f"{where}: {name}")
            for kw in call.keywords:
                if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    problems.append(f"{where}: shell={ast.unparse(kw.value)}")
            if call.args and isinstance(call.args[0], (ast.JoinedStr, ast.BinOp)) or (
                    call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str)):
                problems.append(f"{where}: a command string, not an argument list")
    assert seen >= 4, "the scan found no subprocess calls: it is looking in the wrong place"
    assert problems == []


def test_no_code_path_turns_trust_remote_code_on_by_itself():
    """transformers runs a repo's own code only with trust_remote_code=True; Kiln never passes a literal True."""
    literal_true = []
    for path in PRODUCTION:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value is True:
                        literal_true.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert literal_true == []


def test_the_converter_runs_offline():
    """The converter's own `from_pretrained` calls cannot download code (or anything) from the Hub."""
    from tasks.toolchain import converter_env

    assert converter_env(Path("/nonexistent"))["HF_HUB_OFFLINE"] == "1"


def _write_model(folder: Path, config: dict, **files: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, data in files.items():
        (folder / name.replace("__", ".")).write_bytes(data)
    return folder


def test_custom_code_named_only_by_the_tokenizer_config_is_refused(tmp_path):
    from tasks.errors import RemoteCodeRefused
    from tasks.fetch import locate_metadata, parse_source

    folder = _write_model(tmp_path / "m", {"architectures": ["LlamaForCausalLM"]},
                          tokenizer_config__json=json.dumps(
                              {"auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}}).encode())
    with pytest.raises(RemoteCodeRefused, match="tokenization_evil"):
        locate_metadata(parse_source(str(folder)))


class _Payload:
    """Unpickling this writes a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


def test_a_pickle_is_never_loaded_unless_allowed(tmp_path, toolchain, demo_model_dir):
    """The demo's config and tokenizer, and weights only as a pickle that would leave a file if ever loaded."""
    import shutil

    from registry.models import ExportRequest
    from tasks.errors import PickleRefused
    from tasks.fetch import fetch_source, locate_metadata, parse_source
    from tasks.preflight import run_preflight

    marker = tmp_path / "was-unpickled"
    folder = tmp_path / "m"
    folder.mkdir()
    for item in demo_model_dir.iterdir():  # config, tokenizer and chat template: all but the weights
        if item.is_file() and not item.name.endswith(".safetensors"):
            shutil.copy(item, folder / item.name)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    ref = parse_source(str(folder))
    meta, derived = locate_metadata(ref)
    request = ExportRequest(source=str(folder), out_dir=str(tmp_path / "out"))
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        run_preflight(ref, meta, request, toolchain)
    with pytest.raises(PickleRefused, match="arbitrary code"):
        fetch_source(ref, meta, derived)
    assert not marker.exists()
