"""Both ends of one engine's child process for :mod:`autoshrink.compiler.timing`: the engines
(each loads itself in the child), the child's loop, and :class:`Child`, the parent's handle.

The parent runs this file by path (``python -P timing_child.py``), not as a module of the
package: ``autoshrink.compile`` imports torch and TVM, and an ONNX Runtime child should hold
ONNX Runtime alone. So this module imports only the standard library at the top; each engine
imports what it runs when it loads.

Protocol: JSON requests on stdin, one a line, each answered by one JSON line on the original
stdout (fd 1 is then pointed at stderr, which the parent keeps in a file, so what libraries
print cannot corrupt an answer nor reach the terminal).

- first line ``{"engine": {...}, "shape": [...], "batches": [...], "threads": n, "seed": s}``:
  set the thread count, load the engine, make each batch's input and warm it up;
  answers ``{"ready": true}``.
- ``{"calibrate": min_repeat_s}``: the calls per sample of each batch, so that one sample
  lasts at least ``min_repeat_s``; answers ``{"calls": {batch: n}, "seconds": {batch: s}}``.
- ``{"sample": batch}``: times that many calls; answers ``{"ms": t, "settled_ms": w}``,
  milliseconds per call and how long the engine's worker threads then took to go quiet.
- end of input: the child exits.

Every answer waits for the engine's worker threads to go quiet (:func:`settle`), so the
next engine's sample does not share the cores with this one's spinning threads. Any failure
answers ``{"error": "<last line of the traceback>"}`` and exits with status 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

__all__ = [
    "Child",
    "ChildFailed",
    "Engine",
    "OnnxEngine",
    "TorchEngine",
    "TvmEngine",
    "engine_from_spec",
    "spec",
]

#: Runs the engine ``n`` times on its input and waits for the last result.
Calls = Callable[[int], None]
#: Given a batch size and its input, the :data:`Calls` that time it.
Prepare = Callable[[int, Any], Calls]


@dataclass(frozen=True)
class TvmEngine:
    """A Relax VM library (``export_library``) whose function ``main_b<B>`` takes one float32
    tensor of shape ``(B, *shape)`` and returns a tuple whose element 0 is the output."""

    kind: ClassVar[str] = "tvm"
    library: Path
    device: str = "cpu"

    def load(self, threads: int) -> Prepare:
        """Load the library (TVM's pool reads ``TVM_NUM_THREADS``, set before this)."""
        import tvm
        from tvm import relax

        device = tvm.device(self.device)
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(self.library)), device)

        def prepare(batch: int, x: Any) -> Calls:
            function = vm[f"main_b{batch}"]
            tensor = tvm.runtime.tensor(x, device)

            def calls(n: int) -> None:
                for _ in range(n):
                    function(tensor)
                device.sync()  # GPU kernels launch asynchronously

            return calls

        return prepare


@dataclass(frozen=True)
class TorchEngine:
    """A ``torch.export`` program (``torch.export.save``) run eagerly, or through
    ``torch.compile`` (inductor, static shapes: one compile per batch size, during warm-up)
    with ``compiled``; always under ``torch.inference_mode()``."""

    kind: ClassVar[str] = "torch"
    program: Path
    compiled: bool

    def load(self, threads: int) -> Prepare:
        """Load the program with torch limited to ``threads`` threads."""
        import torch

        torch.set_num_threads(threads)
        module = torch.export.load(str(self.program)).module()
        if self.compiled:
            module = torch.compile(module, dynamic=False)

        def prepare(batch: int, x: Any) -> Calls:
            tensor = torch.from_numpy(x)

            def calls(n: int) -> None:
                with torch.inference_mode():
                    for _ in range(n):
                        module(tensor)

            return calls

        return prepare


@dataclass(frozen=True)
class OnnxEngine:
    """An ONNX model run by ONNX Runtime's CPU provider: ``threads`` intra-op threads, one
    inter-op thread, sequential execution."""

    kind: ClassVar[str] = "onnx"
    model: Path

    def load(self, threads: int) -> Prepare:
        """Open an inference session on the model."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(self.model), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def prepare(batch: int, x: Any) -> Calls:
            feed = {name: x}

            def calls(n: int) -> None:
                for _ in range(n):
                    session.run(None, feed)

            return calls

        return prepare


Engine = TvmEngine | TorchEngine | OnnxEngine
_KINDS: dict[str, type[Engine]] = {e.kind: e for e in (TvmEngine, TorchEngine, OnnxEngine)}


def spec(engine: Engine) -> dict[str, Any]:
    """``engine`` as JSON-ready data (paths as strings), read back by :func:`engine_from_spec`."""
    data = {f.name: getattr(engine, f.name) for f in dataclasses.fields(engine)}
    return {
        "kind": engine.kind,
        **{k: str(v) if isinstance(v, Path) else v for k, v in data.items()},
    }


def engine_from_spec(data: dict[str, Any]) -> Engine:
    """The engine :func:`spec` described."""
    cls = _KINDS[data["kind"]]
    values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
    paths = {f.name for f in dataclasses.fields(cls) if f.type in ("Path", Path)}
    return cls(**{k: Path(v) if k in paths else v for k, v in values.items()})


def _calibrate(calls: Calls, min_repeat_s: float) -> tuple[int, float]:
    """The calls per sample that make it last ``min_repeat_s``, and how long it then took."""
    number = 1
    while True:
        start = time.perf_counter()
        calls(number)
        elapsed = time.perf_counter() - start
        if elapsed >= min_repeat_s or number >= 1_000_000:
            return number, elapsed
        number = max(2 * number, int(number * min_repeat_s / max(elapsed, 1e-9) * 1.2))


def _workers_ns() -> int:
    """CPU time (ns) used so far by this process's threads other than the calling one, from
    ``/proc/self/task/*/schedstat`` (Linux; 0 elsewhere)."""
    me, total = threading.get_native_id(), 0
    with contextlib.suppress(OSError):
        for tid in os.listdir("/proc/self/task"):
            if int(tid) != me:
                with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total


def settle(window_s: float = 0.005, busy: float = 0.05, limit_s: float = 1.0) -> float:
    """Wait until the engine's worker threads are quiet: less than ``busy`` of one core over
    ``window_s`` (TVM's pool spins up to 300,000 ``sched_yield`` calls after a job, OpenMP's
    and ONNX Runtime's spin too), at most ``limit_s``; returns the seconds waited."""
    start = time.perf_counter()
    used = _workers_ns()
    while time.perf_counter() - start < limit_s:
        time.sleep(window_s)
        now = _workers_ns()
        if now - used < busy * window_s * 1e9:
            break
        used = now
    return time.perf_counter() - start


def serve(requests: IO[str], answer: Callable[[dict[str, Any]], None]) -> None:
    """Answer the parent's ``requests`` (see the module's docstring) until they end."""
    setup = json.loads(requests.readline())
    threads = int(setup["threads"])
    for name in ("OMP_NUM_THREADS", "TVM_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)  # before any library starts its thread pool
    prepare = engine_from_spec(setup["engine"]).load(threads)

    import numpy as np

    runs: dict[str, Calls] = {}
    for batch in setup["batches"]:
        rng = np.random.default_rng([int(setup["seed"]), batch])  # the same in every child
        x = rng.standard_normal((batch, *setup["shape"]), dtype=np.float32)
        runs[str(batch)] = calls = prepare(batch, x)
        calls(1)  # the first call may compile (torch.compile) or allocate
        calls(3)
    settle()
    answer({"ready": True})
    calls_per_sample: dict[str, int] = {}
    for line in requests:
        request = json.loads(line)
        if "calibrate" in request:
            found = {b: _calibrate(run, float(request["calibrate"])) for b, run in runs.items()}
            calls_per_sample = {b: n for b, (n, _) in found.items()}
            settle()
            answer({"calls": calls_per_sample, "seconds": {b: s for b, (_, s) in found.items()}})
        elif "sample" in request:
            batch = str(request["sample"])
            number = calls_per_sample[batch]
            gc.disable()  # as timeit does: a collection is not the engine's time
            try:
                start = time.perf_counter()
                runs[batch](number)
                elapsed = time.perf_counter() - start
            finally:
                gc.enable()
            # Answered once quiet: the next engine's sample must not share the cores with
            # this one's spinning workers.
            answer({"ms": elapsed / number * 1e3, "settled_ms": settle() * 1e3})


# --- the parent's end ----------------------------------------------------------------------


class ChildFailed(Exception):
    """A child failed; the message is the reason, one line."""


class Child:
    """The parent's end: one engine's child process, started on ``setup`` (the first
    request) with ``threads`` threads. Its stderr goes to a temporary file, read back only to
    say why it failed."""

    def __init__(self, setup: dict[str, Any], threads: int) -> None:
        env = {**os.environ, **dict.fromkeys(("OMP_NUM_THREADS", "TVM_NUM_THREADS"), str(threads))}
        self.log = tempfile.TemporaryFile()  # the child's stderr: read back for notes only
        self.buffer = b""
        self.process = subprocess.Popen(
            [sys.executable, "-P", __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        with contextlib.suppress(OSError):  # a child already gone says why on the first ask
            self._send(setup)  # answered once loaded: ask(None, timeout) waits for it

    def _send(self, request: dict[str, Any]) -> None:
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()

    def ask(self, request: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """Send ``request`` (none: send nothing, wait for an answer due) and return the answer
        within ``timeout`` seconds; raise :class:`ChildFailed` saying why when there is none."""
        try:
            if request is not None:
                self._send(request)
        except OSError as exc:  # the child is gone
            raise ChildFailed(self.reason()) from exc
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(f"no answer within {timeout:.0f} s")
            if select.select([self.process.stdout], [], [], left)[0]:
                chunk = os.read(self.process.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise ChildFailed(self.reason())
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        answer = json.loads(line)
        if "error" in answer:
            raise ChildFailed(answer["error"])
        return answer

    def reason(self) -> str:
        """Why the child ended: the last line it wrote to stderr, else its exit status."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)
        self.log.seek(0)
        lines = [s for s in self.log.read().decode(errors="replace").splitlines() if s.strip()]
        return lines[-1].strip()[:300] if lines else f"exited with status {self.process.poll()}"

    def stop(self) -> None:
        """Tell the child to exit (end of its input); :meth:`close` waits for it."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()

    def close(self) -> None:
        """End the child: end of input, then SIGTERM, then SIGKILL, two seconds apart."""
        self.stop()
        for stop in (self.process.terminate, self.process.kill):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=2)
            if self.process.poll() is not None:
                break
            stop()
        self.process.wait()
        self.process.stdout.close()
        self.log.close()


def main() -> None:
    """Serve stdin; answers go to the original stdout, all other output to stderr."""
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def answer(message: dict[str, Any]) -> None:
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    try:
        serve(sys.stdin, answer)
    except BaseException as exc:
        traceback.print_exc()
        lines = traceback.format_exception_only(exc)[-1].strip().splitlines()
        try:
            answer({"error": (lines[-1] if lines else type(exc).__name__)[:300]})
        except OSError:  # the parent has gone
            pass
        sys.exit(1)


if __name__ == "__main__":
    main()
