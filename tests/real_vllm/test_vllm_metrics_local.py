"""The guardian reads vLLM's metrics in process as vLLM's ``/metrics`` route does (``vllm_metrics.read_local``).

With several API servers (``vllm serve --data-parallel-size N`` starts N),
vLLM sets ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` serves
``vllm.v1.metrics.prometheus.get_prometheus_registry()``: a collector summing
every API server's files. Here two writer processes stand in for two API
servers (each records what its requests saw on engines 0 and 1, with vLLM's
names and labels), and a third, with real vLLM imported, reads the sum; and
in one process without that variable, the process's own registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

_WRITER = textwrap.dedent(
    """
    import sys
    from prometheus_client import Counter, Histogram
    ttft = Histogram("vllm:time_to_first_token_seconds", "t", labelnames=["model_name", "engine"],
                     buckets=[0.01, 0.02, 0.04, 0.06, 0.08, 0.1])
    done = Counter("vllm:request_success", "d", labelnames=["model_name", "engine", "finished_reason"])
    for rank, seconds, n in [(0, 0.015, int(sys.argv[1])), (1, 0.09, int(sys.argv[2]))]:
        for _ in range(n):
            ttft.labels("m", str(rank)).observe(seconds)
            done.labels("m", str(rank), "length").inc()
    """
)

_READER = textwrap.dedent(
    """
    import json, os, sys
    from prometheus_client import Counter
    from vllm_custom_patches._ops.vllm_metrics import parse, read_local

    def engines():
        snapshot = parse(read_local(), at=0.0)
        return {str(rank): {**state.counters, "ttft": state.histograms["ttft"].count if "ttft" in state.histograms
                            else None} for rank, state in snapshot.engines.items()}

    # One API server: the process's own registry (vLLM reads the variable at each /metrics request).
    Counter("vllm:request_success", "d", labelnames=["model_name", "engine", "finished_reason"]).labels(
        "m", "3", "error").inc(2)
    alone = engines()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]  # several: every API server's files, summed
    print("RESULT " + json.dumps({"alone": alone, "several": engines()}))
    """
)


def test_one_api_server_is_read_from_its_registry_several_as_their_sum_per_engine(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    writers = {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for args in (("3", "1"), ("2", "4")):  # two API servers: requests each saw on engines 0 and 1
        result = subprocess.run([sys.executable, "-c", _WRITER, *args], env=writers, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    result = subprocess.run([sys.executable, "-c", _READER, str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    read = json.loads(line.removeprefix("RESULT "))
    assert read["alone"] == {"3": {"requests": 2.0, "failed_requests": 2.0, "generation_tokens": 0.0, "ttft": None}}
    assert read["several"] == {
        "0": {"requests": 5.0, "failed_requests": 0.0, "generation_tokens": 0.0, "ttft": 5.0},
        "1": {"requests": 5.0, "failed_requests": 0.0, "generation_tokens": 0.0, "ttft": 5.0},
    }
