"""A Hugging Face Hub on loopback for the fetch tests: olah serving git+LFS repositories, and a fault proxy.

- `hub_mirror` (session): a mirrors folder of small git+LFS repositories made here
  (sharded safetensors, a missing shard, pickles only, custom code, GGUF files),
  served by `olah-cli` (PyPI `olah`, a real Hub mirror) on 127.0.0.1 at a free
  port with `offline = true`; stopped at the end of the session.
- `demo_hub_repo` (session): the demo SmolLM2-135M-Instruct folder (fixture
  `demo_model_dir`; model files only, not `kiln-demo.json`) committed as
  `kiln-test/SmolLM2-135M-Instruct`; yields `(endpoint, repo_id, sha)`.
- `hub_proxy` (session) / `faults` (function): `tests/support/hub_faults_proxy.py` in
  front of olah, for dropped connections, corrupt bodies and gated answers.
- `hub_env` (function): points huggingface_hub at the proxy the way a user
  would, through `HF_ENDPOINT`, with a fresh `HF_HUB_CACHE`, `HF_HOME` and
  `KILN_CACHE_DIR`, no token and offline mode off. Kiln reads these at call
  time; the only things patched are huggingface_hub's import-time copies of the
  offline flag and token path, so a developer's own settings cannot leak in.

Commits are made with fixed names and dates, so every repository's SHA is the
same on every run. Registered for every test by `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests.support.hub_faults_proxy import FaultProxy

ORG = "kiln-test"
DEMO_REPO = f"{ORG}/SmolLM2-135M-Instruct"
TINY_REPO = f"{ORG}/tiny-sharded"
MISSING_SHARD_REPO = f"{ORG}/missing-shard"
PICKLE_REPO = f"{ORG}/pickle-only"
CUSTOM_CODE_REPO = f"{ORG}/custom-code"
GGUF_REPO = f"{ORG}/tiny-GGUF"
BIG_REPO = f"{ORG}/one-big-shard"  # one 24 MiB shard: more than huggingface_hub's 10 MiB download chunk
GATED_REPO = f"{ORG}/gated-model"  # never created: the proxy answers for it
DEMO_SKIP = {"kiln-demo.json"}
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth")
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


class HubRepo(NamedTuple):
    endpoint: str
    repo_id: str
    sha: str


class HubMirror(NamedTuple):
    endpoint: str
    mirrors: Path
    shas: dict[str, str]


# --------------------------------------------------------------------------- repositories


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update({
        "GIT_AUTHOR_NAME": "Kiln tests", "GIT_AUTHOR_EMAIL": "tests@kiln.invalid",
        "GIT_COMMITTER_NAME": "Kiln tests", "GIT_COMMITTER_EMAIL": "tests@kiln.invalid",
        "GIT_AUTHOR_DATE": "2024-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00+0000",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
    })
    return env


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, env=_git_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {done.stderr.strip()}")
    return done.stdout.strip()


def make_lfs_repo(mirrors: Path, repo_id: str, files: dict[str, bytes | Path]) -> str:
    """A non-bare git repository with git-lfs at <mirrors>/models/<org>/<name>; returns its commit SHA.

    `files` maps repo paths to bytes or to a file to link (or copy) in. Weights
    (`LFS_PATTERNS`) are stored as LFS objects, the rest as plain git blobs, as on the Hub.
    """
    if shutil.which("git-lfs") is None:
        pytest.fail("git-lfs is needed for the loopback Hub: apt-get install -y git-lfs")
    repo = mirrors / "models" / repo_id
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "lfs", "install", "--local")
    (repo / ".gitattributes").write_text(
        "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
    )
    for rel, content in files.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            try:
                os.link(content, target)
            except OSError:
                shutil.copyfile(content, target)
        else:
            target.write_bytes(content)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"{repo_id}: test fixture")
    return _git(repo, "rev-parse", "HEAD")


def tiny_safetensors(tensors: dict[str, tuple[int, ...]], seed: int) -> bytes:
    """A valid safetensors file of float32 tensors with deterministic values."""
    from safetensors.numpy import save

    rng = np.random.default_rng(seed)
    return save({name: rng.standard_normal(shape).astype(np.float32) for name, shape in tensors.items()})


def tiny_model_files(*, with_shard2: bool = True) -> dict[str, bytes]:
    """config, tokenizer files, an index over two shards (the first ~2 MB), plus files fetch must skip."""
    shard1 = tiny_safetensors({"model.embed_tokens.weight": (512, 1024)}, seed=1)
    shard2 = tiny_safetensors({"model.norm.weight": (1024,), "lm_head.weight": (8, 1024)}, seed=2)
    index = {"metadata": {"total_size": len(shard1) + len(shard2)},
             "weight_map": {"model.embed_tokens.weight": SHARD1, "model.norm.weight": SHARD2,
                            "lm_head.weight": SHARD2}}
    files = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                   "bos_token_id": 0, "eos_token_id": [2, 7]}).encode(),
        "tokenizer_config.json": b'{"model_max_length": 2048}',
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}).encode(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        SHARD1: shard1,
        "README.md": b"# tiny\n",
        "pytorch_model.bin": b"not a real pickle, and never downloaded",
        "consolidated.safetensors": tiny_safetensors({"x": (4,)}, seed=3),
    }
    if with_shard2:
        files[SHARD2] = shard2
    return files


def tiny_gguf(tag: str) -> bytes:
    """A whole GGUF of 64 KiB (one f32 tensor, `tag` as general.name), written by gguf-py: fetch checks its
    tensor table against its size, and never loads it."""
    import tempfile

    import gguf

    with tempfile.TemporaryDirectory(prefix="kiln-tiny-gguf-") as tmp:
        path = Path(tmp) / "tiny.gguf"
        writer = gguf.GGUFWriter(str(path), "llama")
        writer.add_name(tag)
        writer.add_tensor("tiny.weight", np.arange(64 * 256, dtype=np.float32).reshape(64, 256))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def big_model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "model.safetensors": tiny_safetensors({"model.embed_tokens.weight": (3072, 2048)}, seed=6),
    }


def _fixture_repos() -> dict[str, dict[str, bytes]]:
    return {
        BIG_REPO: big_model_files(),
        TINY_REPO: tiny_model_files(),
        MISSING_SHARD_REPO: tiny_model_files(with_shard2=False),
        PICKLE_REPO: {
            "config.json": b'{"architectures": ["GPT2LMHeadModel"]}',
            "pytorch_model.bin": b"pickle bytes that must not be fetched without allow_pickle",
        },
        CUSTOM_CODE_REPO: {
            "config.json": json.dumps({"architectures": ["CustomForCausalLM"],
                                       "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                    "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
                                       }).encode(),
            "configuration_custom.py": b"raise SystemExit('remote code ran')\n",
            "modeling_custom.py": b"raise SystemExit('remote code ran')\n",
            "model.safetensors": tiny_safetensors({"w": (4, 4)}, seed=4),
        },
        GGUF_REPO: {
            "tiny.Q5_0.gguf": tiny_gguf("Q5_0"),
            "tiny.q5_0.gguf": tiny_gguf("q5_0 lowercase"),
            "tiny.Q4_K_M.gguf": tiny_gguf("Q4_K_M"),
            "tiny.Q4_K_S.gguf": tiny_gguf("Q4_K_S"),
            "README.md": b"# tiny GGUF\n",
        },
    }


# --------------------------------------------------------------------------- olah


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _olah_cli() -> str:
    local = Path(sys.executable).with_name("olah-cli")
    found = str(local) if local.exists() else shutil.which("olah-cli")
    if not found:
        pytest.fail("olah-cli not found: pip install olah==0.5.4 (the test extra)")
    return found


def _wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"olah exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"olah was not ready at {url} within {timeout} s: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the group this fixture created for it
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def hub_mirror(tmp_path_factory: pytest.TempPathFactory):
    """olah on 127.0.0.1 over a mirrors folder of fixture repositories; yields a HubMirror."""
    root = tmp_path_factory.mktemp("hub")
    mirrors = root / "mirrors"
    shas = {repo_id: make_lfs_repo(mirrors, repo_id, files) for repo_id, files in _fixture_repos().items()}
    for attempt in range(3):
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        config = root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {port}\n'
            f'repos-path = "{root / "olah-cache"}"\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "127.0.0.1:{port}"\nmirror-lfs-netloc = "127.0.0.1:{port}"\n'
            f'mirrors-path = ["{mirrors}"]\n'
            "[accessibility]\noffline = true\n"
        )
        log = root / f"olah-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([_olah_cli(), "-c", str(config)], cwd=root, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(proc, f"{endpoint}/api/models/{TINY_REPO}/revision/{shas[TINY_REPO]}", log)
            break
        except RuntimeError:
            _stop(proc)
            if attempt == 2:
                raise
    try:
        yield HubMirror(endpoint=endpoint, mirrors=mirrors, shas=shas)
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def demo_hub_repo(hub_mirror: HubMirror, demo_model_dir: Path) -> HubRepo:
    """The demo SmolLM2 folder as a Hub repository on the loopback mirror: (endpoint, repo_id, sha)."""
    files = {p.name: p for p in sorted(demo_model_dir.iterdir()) if p.is_file() and p.name not in DEMO_SKIP}
    sha = make_lfs_repo(hub_mirror.mirrors, DEMO_REPO, files)
    urllib.request.urlopen(f"{hub_mirror.endpoint}/api/models/{DEMO_REPO}/revision/{sha}", timeout=30).close()
    return HubRepo(endpoint=hub_mirror.endpoint, repo_id=DEMO_REPO, sha=sha)


@pytest.fixture(scope="session")
def hub_proxy(hub_mirror: HubMirror):
    proxy = FaultProxy(hub_mirror.endpoint).start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def faults(hub_proxy: FaultProxy) -> FaultProxy:
    """The proxy with no faults armed and an empty request log."""
    hub_proxy.reset()
    yield hub_proxy
    hub_proxy.reset()


@pytest.fixture
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, faults: FaultProxy) -> Path:
    """HF_ENDPOINT at the proxy, fresh hub and Kiln caches, no token, online. Returns the hub cache folder."""
    from huggingface_hub import constants

    hub_cache = tmp_path / "hf-hub"
    monkeypatch.setenv("HF_ENDPOINT", faults.url)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
    return hub_cache
