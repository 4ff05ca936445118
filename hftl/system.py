"""What the machine gives a process: CPU cores per local rank, torch threads, DataLoader workers, allocator settings.

Low on purpose: data, fast paths and the trainer all import it, and it imports nothing from hftl.
"""

import ctypes
import os
import sys

import torch


def default_num_workers(gpu: bool | None = None, cores: int | None = None, local_processes: int | None = None) -> int:
    """DataLoader workers when none are set. CPU-only: none, since the model's own threads already use every core
    (a worker measured 1.02x train and 0.64x eval speed on 2 cores, bench/). With a GPU: the cores each local
    process has, less the one that drives the GPU, at most 8, so decoding and augmentation keep up."""
    if not (torch.cuda.is_available() if gpu is None else gpu):
        return 0
    return min(8, cores_per_local_process(cores, local_processes) - 1)


def cores_per_local_process(cores: int | None = None, local_processes: int | None = None) -> int:
    """The CPU cores this process may use (its affinity), shared with the other ranks on this machine."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # set by accelerate launch / torchrun
    return max(1, cores // local_processes)


def keep_freed_memory() -> bool:
    """CPU training on glibc: keep freed blocks in the process rather than handing large ones back to the OS (mmap
    threshold, heap trimming) and page-faulting them in again at the next step. A bare training loop measured
    ~85 ms/step every time with this against 85-134 ms/step without it (EfficientNet-Lite0, 2 cores); ViT-small
    +6-12%. Peak memory is unchanged; the process simply keeps it until it exits. False where not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD (-3) at glibc's maximum (32 MiB on 64-bit) and M_TRIM_THRESHOLD (-1) at 1 GiB
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (exec). Linux: the address space's high-water mark
    (VmHWM); `getrusage`'s ru_maxrss is not used there because a child keeps its parent's RSS at fork in it, so a
    small child of a big process reports the parent's size."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # macOS reports bytes


def return_arrow_memory_to_the_os() -> None:
    """Arrow's default allocator (mimalloc) keeps what it frees for reuse: converting a large parquet folder to
    datasets' cache left hundreds of MB in the process for the whole run; glibc's allocator hands large blocks back
    (peak RSS in bench/README.md's scale section). An ARROW_DEFAULT_MEMORY_POOL the user set is kept."""
    if "ARROW_DEFAULT_MEMORY_POOL" not in os.environ:
        import pyarrow

        pyarrow.set_memory_pool(pyarrow.system_memory_pool())


def launched_by_accelerate() -> bool:
    """`accelerate launch` (every launcher it has) sets ACCELERATE_DYNAMO_BACKEND in the child's environment;
    nothing in the child process sets it."""
    return "ACCELERATE_DYNAMO_BACKEND" in os.environ


# torch's threads: `accelerate launch` without `--cpu` (or `--num_cpu_threads_per_process`, or an accelerate config)
# exports OMP_NUM_THREADS=1 to its child unless the user's environment already set it, and torch then trained on one
# thread: the README's own command ran 1.5x slower on CPU than with `--cpu` (bench/README.md). So unless the user
# chose a count (`--num_threads`, or OMP_NUM_THREADS set by them), torch gets the cores this process may use.
def configure_threads(num_threads: int | None = None) -> tuple[int, str]:
    """Sets torch's intra-op threads; returns (count, why) for the run's log."""
    if num_threads:
        torch.set_num_threads(num_threads)
        return num_threads, "--num_threads"
    omp = os.environ.get("OMP_NUM_THREADS")
    # accelerate's launcher writes "1" when it was given no count; any other value came from the user (their
    # environment, --num_cpu_threads_per_process, or accelerate's own --cpu sizing): respected
    if omp and not (omp.strip() == "1" and launched_by_accelerate()):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    cores = cores_per_local_process()
    torch.set_num_threads(cores)
    return cores, "cores per local process"
