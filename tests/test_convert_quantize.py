"""The convert-quantize subflow's own parts: parallel quantizations within the memory budget,
Prefect cache keys that follow content, and cache entries that are rebuilt when their files change."""

from __future__ import annotations

from pathlib import Path

from tests.support.prefect_server import logs_once


def test_quantizations_in_parallel_stay_within_the_memory_budget(monkeypatch):
    from flows.convert_quantize import quant_job_memory, quant_parallelism

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    per_job = quant_job_memory(Path("unused"), {"hidden_size": 4096, "vocab_size": 128256, "intermediate_size": 14336})
    assert 5e9 < per_job < 6e9  # ten bytes an element of the 128256 × 4096 embedding
    assert quant_parallelism(4, per_job, budget=12 << 30) == (2, 8)
    assert quant_parallelism(4, per_job, budget=64 << 30) == (4, 4)
    assert quant_parallelism(4, per_job, budget=1 << 30) == (1, 16)  # at least one, always
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    # Two cores: two jobs side by side, two threads each (one job's reads and writes idle its threads).
    assert quant_parallelism(4, 1 << 20, budget=64 << 30) == (2, 2)
    assert quant_parallelism(1, 1 << 20, budget=64 << 30) == (1, 2)


def test_prefect_cache_keys_follow_content_not_folders(toolchain):
    from tasks.convert import _convert_cache_key, gguf_cache_path
    from tasks.quantize import _quantize_cache_key

    a = _convert_cache_key(None, {"model_dir": Path("/a"), "content_key": "k1", "outtype": "f16", "toolchain": toolchain})
    b = _convert_cache_key(None, {"model_dir": Path("/b"), "content_key": "k1", "outtype": "f16", "toolchain": toolchain})
    c = _convert_cache_key(None, {"model_dir": Path("/a"), "content_key": "k1", "outtype": "bf16", "toolchain": toolchain})
    assert a == b != c
    assert toolchain.cache_key in a
    src = gguf_cache_path("k1", "f16", toolchain)
    q8 = _quantize_cache_key(None, {"src": src, "dst": gguf_cache_path("k1", "q8_0", toolchain), "quant": "q8_0", "nthread": 1})
    q4 = _quantize_cache_key(None, {"src": src, "dst": gguf_cache_path("k1", "q4_0", toolchain), "quant": "q4_0", "nthread": 8})
    assert q8 != q4 and "q8_0" in q8


def test_a_cache_entry_changed_after_its_stamp_is_not_trusted(tmp_path):
    import os

    from tasks.convert import cache_entry_intact

    entry = tmp_path / "x.gguf"
    entry.write_bytes(b"GGUF")
    assert not cache_entry_intact(entry)  # no stamp
    stamp = tmp_path / "x.gguf.sha256"
    stamp.write_text("abc\n")
    later = entry.stat().st_mtime_ns + 10**9
    os.utime(stamp, ns=(later, later))
    assert cache_entry_intact(entry)
    os.utime(entry, ns=(later + 10**9, later + 10**9))  # edited in place after stamping
    assert not cache_entry_intact(entry)
    entry.unlink()
    assert not cache_entry_intact(entry)


CACHE_GONE = r"""
import json, sys
from pathlib import Path
from prefect import flow
from prefect.context import FlowRunContext
from flows.convert_quantize import convert_and_quantize
from registry.models import ExportRequest
from tasks.fetch import fetch_source, locate_metadata, source_ref
from tasks.toolchain import current_toolchain

request = ExportRequest(source="demo", quants=["q4_0"], verify=False, out_dir=sys.argv[1])
ref = source_ref(request)
source = fetch_source(ref, *locate_metadata(ref))
run_ids = []

@flow(name="cache-probe")
def heavy():
    run_ids.append(str(FlowRunContext.get().flow_run.id))
    return convert_and_quantize(source, request, current_toolchain())

q4 = heavy()["q4_0"]
existed = q4.is_file()
q4.unlink()  # someone cleaned the Kiln cache; Prefect's record still points here
again = heavy()["q4_0"]
print("RESULT " + json.dumps({"runs": run_ids, "existed": existed, "same": again == q4, "rebuilt": q4.is_file()}))
"""


def test_a_cached_result_whose_file_is_gone_is_built_again(prefect_server, tmp_path):
    """Prefect's record says Cached, but the GGUF it points at was deleted: the task runs again."""
    result = prefect_server.run_python(CACHE_GONE, str(tmp_path / "out"))
    assert result["existed"] and result["same"] and result["rebuilt"], result
    logs = logs_once(prefect_server, result["runs"][1], "quantizing again")
    assert "is gone or changed since stamped; quantizing again" in logs
