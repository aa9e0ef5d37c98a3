"""Dr.LLM router decisions on CPU in one C call per decoder layer (router_cpu.c).

The torch path of a decision (window pooling, fc1, GELU, fc2, argmax) is five ATen ops; inside a forward each
runs right after a decoder layer has flushed the caches and costs tens of microseconds whatever its size, so at a
37-token prefill the routers took 3-5 % of the forward. The C kernel does the same arithmetic in one call.

It is compiled on first use with the system C compiler (``$CC``, else ``cc``; ``-O3 -march=native -ffast-math``)
into ``$RETROFIT_CACHE/kernels`` (default ``~/.cache/retrofit/kernels``), named by a hash of the source, the
flags and the machine, so a rebuilt source or another CPU gets its own library. Without a compiler, or with
``RETROFIT_ROUTER_KERNEL=0``, :func:`load` returns None and the runtime keeps the torch path: the kernel is a
speed-up, never a requirement. Decisions equal the torch path's except where two logits are within float
rounding of each other (the kernel sums in another order).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("router_cpu.c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-shared", "-fPIC")
ENV_SWITCH = "RETROFIT_ROUTER_KERNEL"
MASKED = -1e30  # the kernel's bias for a masked action (fast-math may not keep -inf)

_lock = threading.Lock()
_loaded: dict[str, object] = {}


def _cache_dir() -> Path:
    return Path(os.environ.get("RETROFIT_CACHE", Path.home() / ".cache" / "retrofit")) / "kernels"


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags (Linux), else the platform."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _build(compiler: str) -> Path:
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + " ".join((compiler, *FLAGS)).encode() + _cpu_id().encode()).hexdigest()[:16]
    out = _cache_dir() / f"router_cpu-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {res.stderr.strip()[-2000:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load():
    """The kernel's C function (argtypes set), or None when it is switched off or cannot be built here."""
    if not enabled():
        return None
    with _lock:
        if "fn" in _loaded:
            return _loaded["fn"]
        fn = None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.info("retrofit: no C compiler found; Dr.LLM routers use the torch decision path")
        else:
            try:
                lib = ctypes.CDLL(str(_build(compiler)))
                fn = lib.retrofit_router_codes
                fn.argtypes = [ctypes.POINTER(ctypes.c_int64)]
                fn.restype = ctypes.c_int64
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                log.warning("retrofit: the CPU router kernel could not be built (%s); using the torch decision "
                            "path", e)
                fn = None
        _loaded["fn"] = fn
        return fn


NARGS = 19


def unpack_counts(packed: int) -> tuple[int, int, int, int]:
    """The kernel's return value -> (rows not finite, skip, execute, repeat)."""
    return packed & 0xFFFF, packed >> 16 & 0xFFFF, packed >> 32 & 0xFFFF, packed >> 48 & 0xFFFF


def _router_tensors(router, knob: torch.Tensor) -> tuple:
    """One router as the kernel reads it: fc1's weight in blocks of 32 units [b' / 32, d, 32], fc1's bias [b'],
    fc2's weight [3, b'] (b' = the bottleneck rounded up to 32; the extra units have zero weights and biases, so
    GELU(0) = 0 reaches no logit) and fc2's bias plus the budget knob [3], all float32 and contiguous."""
    w1, b1 = router.fc1.weight.detach().float().cpu(), router.fc1.bias.detach().float().cpu()
    w2 = router.fc2.weight.detach().float().cpu()
    b, d = w1.shape
    bp = -(-b // 32) * 32
    w1p = w1.new_zeros(bp, d)
    w1p[:b] = w1
    b1p = b1.new_zeros(bp)
    b1p[:b] = b1
    w2p = w2.new_zeros(3, bp)
    w2p[:, :b] = w2
    blocks = w1p.view(bp // 32, 32, d).transpose(1, 2).contiguous()  # [b' / 32, d, 32]
    b2 = (router.fc2.bias.detach().float().cpu() + knob).clamp(min=MASKED).contiguous()
    return blocks, b1p, w2p, b2


class RouterKernel:
    """One set of routers ready for the C kernel (:func:`_router_tensors`; masked actions at :data:`MASKED`)."""

    def __init__(self, fn, routers, bias: torch.Tensor):
        self.fn = fn
        with torch.no_grad():
            knob = bias.detach().float().cpu().clamp(min=MASKED)
            self.tensors = [_router_tensors(r, knob) for r in routers]
        self.b, self.d = self.tensors[0][2].shape[1], routers[0].fc1.weight.shape[1]
        self.ptrs = [tuple(t.data_ptr() for t in ts) for ts in self.tensors]

    def prefill(self, A: torch.Tensor, weights: torch.Tensor, hidden_size: int) -> "KernelPrefill":
        """The per-prefill state: A [B, W, T] (batch stride may be 0) and weights [B, 1, W] float32."""
        return KernelPrefill(self, A, weights, hidden_size)


class KernelPrefill:
    """What stays fixed over one prefill's layers (the pooling, the work space, the codes [L, B]); :meth:`run`
    writes one layer's codes and returns their counts."""

    def __init__(self, kernel: RouterKernel, A: torch.Tensor, weights: torch.Tensor, hidden_size: int):
        if hidden_size != kernel.d:
            raise ValueError(f"the routers take hidden size {kernel.d}, the layer input has {hidden_size}")
        B, W, T = A.shape
        if A.device.type != "cpu" or weights.device.type != "cpu":
            raise ValueError(f"the router kernel runs on CPU tensors, got {A.device} / {weights.device}")
        if B >= 1 << 16:
            raise ValueError(f"the router kernel takes at most 65535 rows, got {B}")
        if A.dtype != torch.float32 or A.stride(2) != 1 or A.stride(1) != T:
            A = A.float().contiguous()
        if weights.dtype != torch.float32 or weights.stride(2) != 1:
            weights = weights.float().contiguous()
        self.kernel = kernel
        self.keep = (A, weights)
        self.work = torch.empty(W * (kernel.d + kernel.b), dtype=torch.float32, device="cpu")  # explicit: the
        # default device may be another (meta, cuda); the kernel needs real CPU memory
        self.codes = torch.empty(len(kernel.ptrs), B, dtype=torch.long, device="cpu")
        self.row_bytes = B * self.codes.element_size()
        args = self.args = (ctypes.c_int64 * NARGS)()
        args[0:5] = [B, T, kernel.d, W, kernel.b]
        args[8:12] = [A.data_ptr(), A.stride(0), weights.data_ptr(), weights.stride(0)]
        args[16], args[18] = self.work.data_ptr(), 0
        self.T, self.rows = T, B
        self.strides = (T * kernel.d, kernel.d, 1)

    def run(self, i: int, hidden: torch.Tensor, logits: torch.Tensor | None = None) -> int:
        """Router ``i`` on hidden [B, T, d] float32 on CPU: its codes (1 + action, 0 = not finite) into
        ``self.codes[i]``; returns the packed counts (:func:`unpack_counts`)."""
        args = self.args
        s = hidden.stride()
        if s != self.strides:  # the usual contiguous [B, T, d] costs one check
            if hidden.shape[1] != self.T or hidden.shape[2] != self.kernel.d:
                raise ValueError(f"the prefill has {self.T} tokens of size {self.kernel.d}, the layer input is "
                                 f"{tuple(hidden.shape)}")
            if s[2] != 1:
                hidden = hidden.contiguous()
                s = hidden.stride()
        args[5], args[6], args[7] = hidden.data_ptr(), s[0], s[1]
        args[12], args[13], args[14], args[15] = self.kernel.ptrs[i]
        args[17] = self.codes.data_ptr() + i * self.row_bytes
        if logits is not None and (logits.dtype != torch.float32 or not logits.is_contiguous()
                                   or logits.shape != (hidden.shape[0], 3)):
            raise ValueError("logits must be a contiguous float32 tensor [B, 3]")
        args[18] = 0 if logits is None else logits.data_ptr()
        return self.kernel.fn(args)
