"""The server's memory model, measured, and the limits a memory budget implies.

Resident memory of a server = what it holds when ready (Python, onnxruntime, every model's weights) + the working
memory of the inference calls running at once. The working memory of one call is a fixed part (GQ selection's
score blocks, onnxruntime's per-call buffers) plus a part that grows linearly with the pixels of its batch, at a
rate that depends on the model and the direction. So each model is measured after warm-up: one call at two sizes
per direction, the peak resident memory above the resident memory before it (Linux: VmHWM, reset through
/proc/self/clear_refs; glibc's heap trimmed first so that freed memory is not counted as free); the line through
the two points gives the fixed bytes and the bytes per pixel. A network with self-attention at a full-image level
grows faster than linearly (the first default model did: 1.2 KB per pixel for tokenize at 256x256, 2.2 KB at
1024x1024); the chosen default has none.

With `--max-memory-mb M`, the server measures, then bounds what can run at once: each model's tokenize and
detokenize workers can both be busy, so a batch may hold at most

    P = (M - resident when ready - reserve - sum of fixed bytes) / sum of bytes per pixel  (every model, both ways)

pixels, and `max_batch_pixels` and `max_image_pixels` become at most P. The reserve (RESERVE_FRACTION of M) covers
what the model does not count: bodies being read, images waiting in the queue (3 bytes per pixel each), responses
being encoded.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("gqtok.memory")
MIB = 2**20
RESERVE_FRACTION = 0.15
CALIBRATION_SIDES = (256, 512)  # square images (and their grids) measured per direction
MIN_BUDGET_PIXELS = 64 * 64  # a budget that cannot run one 64x64 image is refused at start-up


class MemoryMeasurementUnavailable(RuntimeError):
    pass


def status_kib(field: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status in KiB (VmRSS: resident now; VmHWM: the peak since the last reset)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise MemoryMeasurementUnavailable(f"/proc/{pid}/status has no {field}")


def resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    return status_kib("VmRSS") * 1024


def trim_heap() -> None:
    """Give the heap's free memory back to the OS (glibc; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: freed memory may stay resident, measurements err low
        pass


TRIM_SLACK_BYTES = 64 * MIB  # resident growth since the last trim that makes the next call trim


def returning_memory(fn):
    """fn, then the heap trimmed if resident memory grew by TRIM_SLACK_BYTES since the last trim. glibc keeps the
    memory that a large call freed: after rounds of 1440x720 tokenize + detokenize a server sat at 470-530 MiB
    instead of the 150-190 MiB it holds when ready, and that varied from round to round. Trimming after every call
    cost more than the trim: the next call faulted the returned pages back in (a 256x256 tokenize took 34.4 ms of
    CPU instead of 27.5), so only growth is given back; reading the resident size costs microseconds."""
    floor = 0

    def call(*args):
        nonlocal floor
        try:
            return fn(*args)
        finally:
            if resident_bytes() > floor + TRIM_SLACK_BYTES:
                trim_heap()
                floor = resident_bytes()
    return call


def peak_above_now(fn) -> int:
    """Bytes of resident memory that running fn() added at its peak, above the resident memory before it."""
    if not sys.platform.startswith("linux"):
        raise MemoryMeasurementUnavailable("measuring peak memory needs Linux's /proc")
    trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak) to the current resident size
    except OSError as e:
        raise MemoryMeasurementUnavailable(f"cannot reset the peak resident size: {e}") from None
    before = resident_bytes()
    fn()
    return max(0, status_kib("VmHWM") * 1024 - before)


@dataclass
class CallMemory:
    """Peak working memory of one inference call: fixed_bytes + bytes_per_pixel * pixels of the batch."""
    fixed_bytes: float
    bytes_per_pixel: float

    @classmethod
    def fit(cls, pixels: tuple[int, int], peaks: tuple[int, int]) -> CallMemory:
        slope = (peaks[1] - peaks[0]) / (pixels[1] - pixels[0])
        if slope <= 0:  # noise at sizes this small: charge everything to the pixels, which errs high
            return cls(0.0, max(peaks) / pixels[1])
        return cls(max(0.0, peaks[0] - slope * pixels[0]), slope)

    def bytes(self, pixels: int) -> float:
        return self.fixed_bytes + self.bytes_per_pixel * pixels


@dataclass
class ModelMemory:
    tokenize: CallMemory
    detokenize: CallMemory

    def bytes(self, pixels: int) -> float:
        """Both workers of the model busy at once, each with a batch of `pixels`."""
        return self.tokenize.bytes(pixels) + self.detokenize.bytes(pixels)


def measure_model(runtime) -> ModelMemory:
    """The working memory of one tokenize and one detokenize call of a warmed-up TokenizerRuntime."""
    f, t = runtime.manifest.downsample, runtime.manifest.tokens_per_position
    sides = [max(f, side // f * f) for side in CALIBRATION_SIDES]
    peaks = {"tokenize": [], "detokenize": []}
    for side in sides:
        image = np.full((1, side, side, 3), 127, np.uint8)
        grid = np.zeros((1, t, side // f, side // f), np.int64)
        peaks["tokenize"].append(peak_above_now(lambda: runtime.tokenize_posterior(image)))  # what the queue runs
        peaks["detokenize"].append(peak_above_now(lambda: runtime.detokenize(grid)))
    pixels = tuple(side * side for side in sides)
    return ModelMemory(CallMemory.fit(pixels, tuple(peaks["tokenize"])),
                       CallMemory.fit(pixels, tuple(peaks["detokenize"])))


@dataclass
class MemoryPlan:
    budget_bytes: int
    resident_ready_bytes: int
    models: dict[str, ModelMemory]
    batch_pixels: int  # P above: pixels one batch may hold in every worker at once

    def limits(self, max_image_pixels: int, max_batch_pixels: int) -> dict[str, int]:
        return {"max_image_pixels": min(max_image_pixels, self.batch_pixels),
                "max_batch_pixels": min(max_batch_pixels, self.batch_pixels)}

    def predicted_peak_bytes(self, pixels: int) -> float:
        """Resident memory with every worker of every model running a batch of `pixels` at once."""
        return self.resident_ready_bytes + sum(m.bytes(pixels) for m in self.models.values())

    def info(self) -> dict:
        return {"budget_mb": self.budget_bytes / MIB, "resident_when_ready_mb": round(self.resident_ready_bytes / MIB, 1),
                "reserve_fraction": RESERVE_FRACTION, "batch_pixels": self.batch_pixels,
                "models": {mid: {direction: {"fixed_mb": round(call.fixed_bytes / MIB, 1),
                                             "bytes_per_pixel": round(call.bytes_per_pixel, 1)}
                                 for direction, call in (("tokenize", m.tokenize), ("detokenize", m.detokenize))}
                           for mid, m in self.models.items()}}


def plan(budget_mb: float, runtimes: dict) -> MemoryPlan:
    """Measure every model (id -> warmed-up TokenizerRuntime) and the limits `budget_mb` allows; ValueError when the
    budget leaves no room for a 64x64 image."""
    models = {mid: measure_model(rt) for mid, rt in runtimes.items()}
    trim_heap()
    budget, ready = int(budget_mb * MIB), resident_bytes()
    fixed = sum(m.bytes(0) for m in models.values())
    per_pixel = sum(m.bytes(1) for m in models.values()) - fixed
    free = budget * (1 - RESERVE_FRACTION) - ready - fixed
    pixels = int(free / per_pixel) if free > 0 else 0
    if pixels < MIN_BUDGET_PIXELS:
        need = (ready + fixed + MIN_BUDGET_PIXELS * per_pixel) / (1 - RESERVE_FRACTION) / MIB
        raise ValueError(f"--max-memory-mb {budget_mb:g} is too small: the server holds {ready / MIB:.0f} MiB when "
                         f"ready and its inference calls need {fixed / MIB:.0f} MiB plus {per_pixel:.0f} bytes per "
                         f"pixel of a batch; one 64x64 image needs at least {need:.0f} MiB")
    result = MemoryPlan(budget, ready, models, pixels)
    log.info("memory budget %g MiB: %.0f MiB resident when ready, calls %.0f MiB + %.0f bytes per pixel; batches "
             "up to %d pixels", budget_mb, ready / MIB, fixed / MIB, per_pixel, pixels)
    return result


# -- what requests hold outside inference ---------------------------------------------------------------------
# Bytes a request holds per byte or pixel of what it sends or asks for, until it ends (estimates that err high):
BODY_COPIES = 2  # a body as its chunks arrive and joined into one bytes object
JSON_IMAGE_COPIES = 2  # a JSON body of base64 images: the parsed strings and the decoded files, beside the body
JSON_TOKEN_BYTES = 24  # a JSON body of token grids, parsed: a Python int and a list slot (36 B) per 2-12 body bytes
IMAGE_BYTES_PER_PIXEL = 9  # an image decoded or to be answered: RGB, its padded or cropped copy, its encoded answer


class RequestMemory:
    """One account of the bytes that requests hold outside inference: bodies as they arrive, parsed JSON,
    decoded images waiting in the queue, answers being encoded. A request takes what it will hold before it reads
    or decodes it and gives it all back when it ends (app.Gatekeeper); what does not fit is refused at once: 429
    while others hold the memory, 413 when it could never fit. Inference's own working memory is bounded apart,
    by the batch pixels of the MemoryPlan; this account gets what the plan leaves of the budget."""

    SCOPE_KEY = "gqtok.memory"  # the bytes a request holds, in its ASGI scope

    def __init__(self, budget_bytes: int):
        self.budget, self.held = int(budget_bytes), 0

    def take(self, scope: dict, n: int, what: str) -> None:
        from gqtok.service import errors

        n, own = int(n), scope.get(self.SCOPE_KEY, 0)
        if own + n > self.budget:  # not even alone: not worth a retry
            raise errors.PayloadTooLarge(f"{what} needs about {n / MIB:.0f} MiB of memory beside the "
                                         f"{own / MIB:.0f} MiB this request holds; this server has "
                                         f"{self.budget / MIB:.0f} MiB for requests (--max-memory-mb)")
        if self.held + n > self.budget:
            raise errors.TooManyRequests(f"{what} needs about {n / MIB:.1f} MiB of memory; requests in flight hold "
                                         f"{self.held / MIB:.0f} of {self.budget / MIB:.0f} MiB; retry later",
                                         headers={"Retry-After": "1"})
        self.held += n
        scope[self.SCOPE_KEY] = scope.get(self.SCOPE_KEY, 0) + n

    def release(self, scope: dict) -> None:
        self.held -= scope.pop(self.SCOPE_KEY, 0)
