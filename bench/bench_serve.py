"""Load test of `coursekit serve`: 500 requests from 8 concurrent clients against a real uvicorn on 127.0.0.1.

Starts `coursekit serve MODEL.ck` in its own process (by default on the small two-breed pets model that the
serving tests use: EfficientNet-Lite0 at 64 px, exported from the dataset mirror), then 8 client threads,
each with its own keep-alive connection, post mirror photos (pets JPEGs, about 500 x 375) to `/predict`
until 500 requests are done. Prints one JSON line: requests, successes, failures, latency p50/p99 (ms, as
each client measured it: upload, decoding, waiting in the queue, the batched forward pass, the answer) and
throughput (requests/s over the whole run).

    OMP_NUM_THREADS=1 COURSEKIT_MIRROR=/work/shared/datasets PYTHONPATH=$PWD python bench/bench_serve.py
    python bench/bench_serve.py [--model MODEL.ck] [--requests 500] [--clients 8]
"""
import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    "`coursekit serve MODEL --port PORT` in its own process, returned once /health answers."
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "coursekit.cli", "serve", str(model), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"coursekit serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"coursekit serve did not answer within 120 s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


def multipart(photo: bytes) -> tuple:
    "(content type, body) of a form with the photo in the field `file`."
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return f"multipart/form-data; boundary={boundary}", head + photo + f"\r\n--{boundary}--\r\n".encode()


def client_run(port: int, forms: list, n: int, start: int) -> list:
    "One client: `n` requests in turn over one keep-alive connection; [(seconds, status or error)]."
    results = []
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for i in range(n):
        content_type, body = forms[(start + i) % len(forms)]
        began = time.perf_counter()
        try:
            connection.request("POST", "/predict", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            answer = json.loads(response.read())
            outcome = response.status if "label" in answer else f"{response.status}: {answer}"
        except (OSError, http.client.HTTPException, ValueError) as err:
            outcome = f"{type(err).__name__}: {err}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        results.append((time.perf_counter() - began, outcome))
    connection.close()
    return results


def load_test(port: int, photos: list, requests: int = 500, clients: int = 8) -> dict:
    "Send `requests` photos from `clients` concurrent clients; latency percentiles, throughput and failures."
    forms = [multipart(Path(p).read_bytes()) for p in photos]
    shares = [requests // clients + (1 if c < requests % clients else 0) for c in range(clients)]
    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(client_run, [port] * clients, [forms] * clients, shares, range(clients)))
    seconds = time.perf_counter() - began
    results = [r for run in runs for r in run]
    latencies = sorted(t for t, _ in results)
    failures = [outcome for _, outcome in results if outcome != 200]
    return {"requests": len(results), "ok": len(results) - len(failures), "failed": len(failures),
            "first_failures": failures[:3], "clients": clients, "seconds": round(seconds, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
            "throughput_rps": round(len(results) / seconds, 1)}


def run(model: Path | None = None, requests: int = 500, clients: int = 8) -> dict:
    "Start the server (exporting the small pets model when `model` is None), load-test it, stop it."
    sys.path.insert(0, str(REPO / "tests"))
    from serve_model import export_small_model, mirror_photos
    with tempfile.TemporaryDirectory() as work:
        model = model or export_small_model(Path(work))
        port = free_port()
        server = start_server(model, port, Path(work) / "serve.log")
        try:
            result = load_test(port, mirror_photos(), requests, clients)
        finally:
            stop(server)
    result["cpu_threads"] = os.environ.get("OMP_NUM_THREADS", "default")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="an export (default: the small pets model)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(run(args.model, args.requests, args.clients)))


if __name__ == "__main__":
    main()
