"""The load test of bench/bench_serve.py: 500 requests from 8 concurrent clients against `coursekit serve` (a real
uvicorn process on 127.0.0.1); every request must succeed. The figures (p50/p99 latency, throughput) are printed."""
import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_serve.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_serve", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_500_requests_from_8_clients_all_succeed():
    result = bench_module().run(requests=500, clients=8)
    print(result)
    assert result["requests"] == 500
    assert result["failed"] == 0, f"{result['failed']} requests failed, e.g. {result['first_failures']}"
    assert result["p50_ms"] <= result["p99_ms"]
