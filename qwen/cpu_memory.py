"""Where a loaded model's CPU weights live: transparent huge pages, or the file mapping paged in.

One-row decoding streams every weight once per token, so how the weights are mapped
matters: from 2 MiB pages it runs measurably faster than from the 4 KiB pages of the
safetensors file mapping (docs/performance.md). :func:`place_weights` is what the CPU
engine (``cpu_engine.install``) runs on a loaded model.

Part of the self-contained remote-code set: imports its siblings relatively only.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import mmap
import os

import torch
from torch import nn

from .cpu_kernels import env_switched_off

logger = logging.getLogger(__name__)


def place_weights(model: nn.Module) -> None:
    """Move the weights a forward reads in full to huge pages (:func:`huge_page_weights`);
    where that does nothing, map the file pages in now (:func:`map_cpu_weights`)."""
    if not huge_page_weights(model):
        map_cpu_weights(model)


def _resident_weights(model: nn.Module) -> list[torch.Tensor]:
    """The distinct CPU parameters and buffers a forward reads in full: all but the input
    embedding table (a forward reads a few of its rows) unless it doubles as the output
    layer."""
    seen = set()
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embeddings is not None and (head is None or head.weight is not embeddings.weight):
        seen.add(embeddings.weight.data_ptr())
    tensors = []
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.device.type == "cpu" and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            tensors.append(t)
    return tensors


def map_cpu_weights(model: nn.Module) -> None:
    """Touch one element per memory page of every CPU weight, so that weights memory-mapped
    from a safetensors file are mapped into this process at load rather than page by page
    during the first forward (the first request of a server, the first reply of a chat).
    Reads about 1/2000 of the bytes. The input embedding table is left alone (mapping it
    all would add its size to the resident set) unless it doubles as the output layer.
    Skipped where the weights exceed half the RAM (the kernel must page them anyway)."""
    tensors = [t.detach() for t in _resident_weights(model)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    if not tensors or total > _ram_bytes() // 2:
        return
    with torch.no_grad():
        for t in tensors:
            if t.dim() == 1 or t.is_contiguous():  # a view as one row of elements, every page's first
                t.view(-1)[:: max(1, 4096 // t.element_size())].max()


HUGE_PAGES_ENV = "QWEN_HUGE_PAGES"
_HUGE_PAGE = 2 * 2**20
_RELEASE_BYTES = 32 * 2**20


def _transparent_huge_pages() -> bool:
    """Whether this is Linux with transparent huge pages available to ``madvise`` in this
    process (not switched off system-wide nor for the process, ``PR_SET_THP_DISABLE``)."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
        with open("/proc/self/status") as f:
            if any(line.split() == ["THP_enabled:", "0"] for line in f):
                return False
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's memory mappings of regular files (/proc/self/maps;
    Linux)."""
    ranges = []
    try:
        f = open("/proc/self/maps")  # noqa: SIM115
    except OSError:  # no /proc here: nothing is released, the copy still works
        return ranges
    with f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and os.path.isfile(fields[5].rstrip("\n")):
                ranges.append(tuple(int(x, 16) for x in fields[0].split("-")))
    return ranges


# /proc/self/pagemap: one 64-bit entry per page; bit 63 present, 62 swapped, 61 a file page
# (or shared anonymous memory). The flags are readable without privileges (the frame numbers are not).
_PAGEMAP_FILE_PAGE, _PAGEMAP_SWAPPED = 61, 62


def _file_page_runs(pagemap, first: int, last: int) -> list[tuple[int, int]]:
    """The address runs of pages in [first, last) (page-aligned, inside a file mapping) that
    hold the file's bytes: file pages, or pages never loaded. Written pages of a private file
    mapping (anonymous copies, present or swapped out) are left out: dropped with
    ``MADV_DONTNEED`` they would come back as the file's bytes, not what was written."""
    page = mmap.PAGESIZE
    count = (last - first) // page
    pagemap.seek(first // page * 8)
    data = pagemap.read(count * 8)
    if len(data) != count * 8:
        return []
    entries = torch.frombuffer(bytearray(data), dtype=torch.int64)
    present = entries < 0  # bit 63
    if not present.any():  # just copied, so read: flags that say nothing (a sandbox's pagemap)
        return []
    file_page = ((entries >> _PAGEMAP_FILE_PAGE) & 1).bool()
    swapped = ((entries >> _PAGEMAP_SWAPPED) & 1).bool()
    safe = torch.where(present, file_page, ~swapped).tolist()
    runs, start = [], None
    for i, ok in enumerate([*safe, False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            runs.append((first + start * page, first + i * page))
            start = None
    return runs


def huge_page_empty_like(like: torch.Tensor) -> torch.Tensor:
    """An empty contiguous CPU tensor shaped as ``like``, in its own anonymous memory
    mapping advised for transparent huge pages and starting on a 2 MiB boundary (when it
    spans one). Its storage is its own, exactly its size, as for any tensor."""
    nbytes = like.numel() * like.element_size()
    spare = _HUGE_PAGE if nbytes >= _HUGE_PAGE else 0
    block = mmap.mmap(-1, nbytes + spare, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block.madvise(mmap.MADV_HUGEPAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(block))
    offset = (-address) % _HUGE_PAGE if spare else 0
    # the tensor keeps ``block`` alive; the spare part before and after is never touched
    flat = torch.frombuffer(block, dtype=torch.uint8, count=nbytes, offset=offset)
    return flat.view(like.dtype).view(like.shape)


def huge_page_weights(model: nn.Module) -> int:
    """Move the CPU parameters and buffers a forward reads in full (:func:`_resident_weights`;
    buffers only where each is all of its storage) into anonymous memory advised for
    transparent huge pages (Linux), each in its own mapping.

    The file pages each weight was copied from are handed back to the kernel
    (``MADV_DONTNEED`` on the pages wholly inside it) as it goes, so the resident set stays
    about the weights' size; only pages that hold the file's bytes (a page written in a
    private file mapping lives nowhere else: :func:`_file_page_runs`). The moved weights are
    private to the process. Nothing
    happens without transparent huge pages (system-wide or for the process), where the
    weights exceed half the RAM or the cgroup memory limit, or with ``QWEN_HUGE_PAGES=0``
    (or false/off/no). Returns the bytes of the weights it took on, 0 where it did
    nothing; when no anonymous memory is left midway, the rest stay where they are and
    are mapped in (:func:`map_cpu_weights`), with a warning."""
    if env_switched_off(HUGE_PAGES_ENV):
        return 0
    if not _transparent_huge_pages():
        return 0
    # parameters, and buffers a forward reads in full too (a GPTQ linear's packed integers,
    # scales and zero points); not views into another tensor's storage
    params = [t for t in _resident_weights(model) if isinstance(t, nn.Parameter) or _own_storage(t)]
    total = sum(t.numel() * t.element_size() for t in params)
    if not params or total > _ram_bytes() // 2:
        return 0
    files = _file_mappings()
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)  # noqa: SIM115
    except OSError:  # nothing is released, the copy still works
        pagemap, files = None, []
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    with torch.no_grad(), pagemap or contextlib.nullcontext():
        for param in params:
            old = param.data
            try:
                new = huge_page_empty_like(old)
            except OSError as error:  # say, a strict overcommit limit: the rest stay mapped
                logger.warning("weights left in place: no anonymous memory for a copy (%s)", error)
                map_cpu_weights(model)
                break
            start, size = old.data_ptr(), old.element_size()
            if not (old.is_contiguous() and any(a <= start and start + old.numel() * size <= b for a, b in files)):
                new.copy_(old)
            else:  # in pieces, each piece's file pages released once copied
                step = max(1, _RELEASE_BYTES // size)
                for i in range(0, old.numel(), step):
                    new.view(-1)[i : i + step].copy_(old.view(-1)[i : i + step])
                    lo, hi = start + i * size, start + min(old.numel(), i + step) * size
                    first, last = -(-lo // page) * page, hi // page * page
                    for a, b in _file_page_runs(pagemap, first, last) if last > first else ():
                        libc.madvise(ctypes.c_void_p(a), ctypes.c_size_t(b - a), mmap.MADV_DONTNEED)
            param.data = new
    return total


def _own_storage(t: torch.Tensor) -> bool:
    """A contiguous tensor that is all of its storage."""
    return (
        t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()
    )


def _ram_bytes() -> int:
    """Physical memory, or this process's cgroup memory limit where that is lower."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX
        ram = 2**62
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file) as f:
                value = f.read().strip()
        except OSError:
            continue
        if value.isdigit():
            ram = min(ram, int(value))
    return ram
