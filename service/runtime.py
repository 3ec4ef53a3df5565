"""onnxruntime inference for one exported model: pixels <-> token grids. No torch.

    rt = TokenizerRuntime(load_artifact("models/default"))
    ids = rt.tokenize(images_u8)          # uint8 [B, H, W, 3] -> int64 [B, T, H/f, W/f]
    pixels = rt.detokenize(ids)           # -> uint8 [B, H, W, 3]

GQ selection runs on the CPU by the exact search of gqtok/core/select.py (selector
"exact", the default: a k-d tree, float64) or in `gq_select.onnx` (selector "onnx":
the float32 argmax, on the same provider as the encoder). Both give a token the
same id whatever else is in its batch; "exact" gives it on every machine.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading

import numpy as np
import onnxruntime as ort

from gqtok.core import layout
from gqtok.core.artifact import DECODER, ENCODER, GQ_SELECT, Artifact, require_kind
from gqtok.core.kdtree import default_threads, thread_pool
from gqtok.core.select import GaussianQuantizer, fixed_blocks, kl_bits

log = logging.getLogger("gqtok.runtime")


def choose_providers(device: str = "auto") -> list[str]:
    """'auto': CUDA when onnxruntime-gpu sees a GPU, else CPU; 'cuda' insists; 'cpu' forces CPU."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        preload_cuda_libraries()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise RuntimeError(f"device 'cuda' asked for, but onnxruntime offers only {available}")
    return ["CPUExecutionProvider"]


@functools.cache  # once per process: every model's runtime asks
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from their pip wheels (onnxruntime-gpu[cuda,cudnn], the GPU image), so that no CUDA
    base image or LD_LIBRARY_PATH is needed; a no-op where they come from the system instead."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as e:  # a library it cannot load is reported again, clearly, when the session starts
            log.warning("could not preload the CUDA libraries: %s", e)


_inference_nice = 0  # the nice value at which sessions made from now on start their threads (inference_threads)


def inference_threads(threads: int, nice: int = 0) -> None:
    """Run the inference threads made from now on at nice value `nice` (see set_thread_nice): every later
    session's intra-op pool, and the exact GQ search's process-wide pool of `threads` threads (0: one per core),
    made here. Each session keeps a pool of its own, idle threads asleep (session_options): onnxruntime's
    process-wide pool (set_global_thread_pool_sizes) spins between calls and its Python API cannot stop it;
    shared, it cost a 256x256 tokenize 46-54 ms of CPU instead of 27-30 (docs/results.md, the request path)."""
    global _inference_nice
    _inference_nice = nice

    def make_search_pool():
        set_thread_nice(nice)
        # a ThreadPoolExecutor starts a thread in the caller of submit() while none is idle: tasks that wait for
        # each other make all of the search pool's threads here
        search_threads = threads or default_threads()
        started = threading.Barrier(search_threads)
        list(thread_pool(search_threads).map(lambda _: started.wait(), range(search_threads)))

    at_inference_nice(make_search_pool)


def at_inference_nice(fn):
    """fn() in a short-lived thread at the inference nice value, its result or exception passed on: threads
    inherit the nice value of the thread that starts them, which a thread cannot lower again."""
    if _inference_nice <= 0:
        return fn()
    outcome = {}

    def run():
        set_thread_nice(_inference_nice)
        try:
            outcome["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            outcome["error"] = e

    maker = threading.Thread(target=run, name="session-maker")
    maker.start()
    maker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def set_thread_nice(nice: int) -> None:
    """Run the calling thread (and the threads it starts) at nice value `nice` (Linux; 0: leave it). The server
    runs inference and entropy coding at a higher nice value than its event loop, so that under overload the
    loop still admits, refuses and answers health probes at once instead of queueing behind inference for
    the cores (benchmarks/flood.py)."""
    if nice <= 0:
        return
    if sys.platform != "linux":  # elsewhere setpriority on a thread id is not per thread
        log.info("thread priorities are set on Linux only; %s keeps its priority", threading.current_thread().name)
        return
    tid = threading.get_native_id()
    os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))


def one_blas_thread() -> None:
    """numpy's BLAS (OpenBLAS) to one thread for the whole process. The server's parallelism is onnxruntime's
    shared pool plus its coding slots (one core each); BLAS's own pool of one thread per core behind every slot
    ran cores x slots threads. `gqtok compress` and `decompress` do the same, so that their context-prior
    probabilities (float32 products through BLAS, whose sums depend on its thread count) are the server's."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def session_options(threads: int) -> ort.SessionOptions:
    """The options every gqtok session runs with: its own pool of `threads` threads (0: one per core)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads sleep instead of spinning: spinning threads took the cores from the GQ selection
    # and the other sessions (tokenize at batch 1: 187 ms per image spinning, 139 ms not).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No CPU arena: with it, rounds of 1440x720 tokenize + detokenize of the first default model grew past
    # 8 GB resident until the kernel killed the process; without it, 3.0 GB at the peak and 270 MiB after each
    # round (one process, 4 rounds, 2 threads; docs/service.md, memory).
    opts.enable_cpu_mem_arena = False
    return opts


def open_sessions(artifact: Artifact, files: list[str], device: str, threads: int):
    """(a session for each of the artifact's `files`, the providers they really run on), made at the inference
    nice value (inference_threads). onnxruntime-gpu offers CUDA whether or not a GPU is there and falls back to
    the CPU on its own, so the first session tells which provider the model gets."""
    providers = choose_providers(device)
    opts = session_options(threads)
    first = at_inference_nice(lambda: ort.InferenceSession(str(artifact.path(files[0])), opts, providers=providers))
    if providers[0] != first.get_providers()[0]:
        why = (f"onnxruntime offers {providers[0]} but could not use it (no GPU visible to this process, "
               f"or no NVIDIA driver)")
        if device == "cuda":
            raise RuntimeError(f"device 'cuda' asked for: {why}")
        log.warning("%s: model %s runs on %s", why, artifact.manifest.model_id, first.get_providers()[0])
        providers = first.get_providers()
    rest = at_inference_nice(lambda: [ort.InferenceSession(str(artifact.path(f)), opts, providers=providers)
                                      for f in files[1:]])
    return [first, *rest], providers


class TokenizerRuntime:
    """Sessions for one artifact.

    device:   "auto", "cpu" or "cuda" (see choose_providers)
    threads:  intra-op threads per session, and the exact selection's threads (0: one per core)
    selector: "exact" (gqtok/core/select.py's exact selection: the k-d tree search, on the CPU, on `threads`
              threads; with CUDA too, so that a token's id is the same on every machine) or "onnx"
              (gq_select.onnx: the float32 argmax, on the model's provider: the scores stay on a GPU, and a
              token on a near-tie can get another id).
    """

    SELECTORS = ("exact", "onnx")

    def __init__(self, artifact: Artifact, device: str = "auto", threads: int = 0, selector: str = "exact"):
        self.artifact, self.manifest = artifact, artifact.manifest
        require_kind(artifact, "tokenizer", "tokenizing")
        if selector not in self.SELECTORS:
            raise ValueError(f"selector must be one of {', '.join(self.SELECTORS)}, got {selector!r}")
        self.selector = selector
        # gq_select.onnx is checked by load_artifact either way; a session only where it runs (no idle thread pool)
        sessions, self.providers = open_sessions(
            artifact, [ENCODER, DECODER] + ([GQ_SELECT] if selector == "onnx" else []), device, threads)
        self.encoder, self.decoder, self.gq_select = (sessions + [None])[:3]
        self.quantizer = GaussianQuantizer(artifact.codebook, self.manifest.gq_beta, threads=threads,
                                           metric=self.manifest.gq_tree_metric)
        log.info("model %s on %s (selector %s)", self.manifest.model_id, self.encoder.get_providers()[0], selector)

    @property
    def provider(self) -> str:
        return self.encoder.get_providers()[0]

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, H, W, 3] -> mu, logvar float32 [B, C, H/f, W/f]."""
        mu, logvar = self.encoder.run(None, {"image": np.ascontiguousarray(images, dtype=np.uint8)})
        return mu, logvar

    def select(self, mu: np.ndarray, logvar: np.ndarray) -> np.ndarray:
        """Latent grids [B, C, h, w] -> token ids int64 [B, T, h, w]."""
        d = self.manifest.token_dim
        tok_mu, tok_lv = layout.group(mu, d), layout.group(logvar, d)
        shape = tok_mu.shape[:-1]
        flat_mu = np.ascontiguousarray(tok_mu.reshape(-1, d), dtype=np.float32)
        flat_lv = np.ascontiguousarray(tok_lv.reshape(-1, d), dtype=np.float32)
        if self.selector == "exact":
            return self.quantizer.select(flat_mu, flat_lv).reshape(shape)
        ids = np.empty(flat_mu.shape[0], dtype=np.int64)
        for start, m, (mu_b, lv_b) in fixed_blocks(len(ids), self.manifest.gq_select_rows, flat_mu, flat_lv):
            out = self.gq_select.run(None, {"mu": mu_b, "logvar": lv_b, "codebook": self.artifact.codebook})[0]
            ids[start : start + m] = out[:m]
        return ids.reshape(shape)

    def tokenize(self, images: np.ndarray) -> np.ndarray:
        return self.select(*self.encode(images))

    def tokenize_posterior(self, images: np.ndarray) -> np.ndarray:
        """uint8 [B, H, W, 3] -> float64 [B, 3, T, h, w]: token ids, each token's KL to N(0, I) in bits, and the
        mean of its posterior sigmas (how sure the encoder is), from one encoder call. The server's tokenize
        queue runs this, so that /v1/tokenize?posterior=true costs no second pass; ids are exact in float64."""
        mu, logvar = self.encode(images)
        d = self.manifest.token_dim
        lv = layout.group(logvar, d)
        return np.stack([self.select(mu, logvar).astype(np.float64), kl_bits(layout.group(mu, d), lv),
                         np.exp(0.5 * lv.astype(np.float64)).mean(-1)], axis=1)

    def latent_from_ids(self, ids: np.ndarray) -> np.ndarray:
        """int [B, T, h, w] -> float32 latent [B, C, h, w]."""
        return np.ascontiguousarray(layout.ungroup(self.quantizer.lookup(ids)), dtype=np.float32)

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """latent [B, C, h, w] -> float32 [B, H, W, 3] in [0, 1]."""
        return self.decoder.run(None, {"latent": np.ascontiguousarray(latent, dtype=np.float32)})[0]

    def detokenize(self, ids: np.ndarray) -> np.ndarray:
        """int [B, T, h, w] -> uint8 [B, H, W, 3]."""
        return to_uint8(self.decode(self.latent_from_ids(ids)))


def to_uint8(image01: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image01 * 255.0), 0, 255).astype(np.uint8)
