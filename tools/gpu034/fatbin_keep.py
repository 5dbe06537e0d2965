"""Zero the GPU code of other architectures inside shared libraries' fat binaries, in place.

    python3 fatbin_keep.py [--arch 90] LIB.so...

A CUDA fat binary (the ELF sections .nv_fatbin and __nv_relfatbin) holds one entry per kernel set and architecture
(sm_75, sm_80, ..., sm_120). A Hopper GPU (compute capability 9.0) can only run sm_90/sm_90a machine code
(sm_8x code is not binary-compatible across major versions) or PTX of compute_90 or lower, JIT-compiled.
This keeps every entry header and every byte's offset, and overwrites with zeros the payload of
  - machine-code (ELF) entries whose architecture is not --arch,
  - PTX entries whose architecture is above --arch (they could not be JIT-compiled for it).
Nothing moves, so the ELF file stays valid. A compressed (zstd) payload becomes a valid zstd stream that
inflates to as many zero bytes as before (one RLE frame, then a skippable frame of zeros filling the old
length), so a reader that inflates every entry (cuobjdump --list-elf does) still succeeds; zeros
compress to almost nothing. The CUDA runtime should read only the payload of the entry it picks for the
device, an untouched one on --arch: that is the assumption only a GPU can confirm.
Layout (little-endian): container = 16-byte header (u32 magic 0xBA55ED50, u16 version, u16 header
size, u64 size of the entries), then entries: u16 kind (1 PTX, 2 or 0x10 ELF), u16, u32 header size,
u64 payload size (padded), u32 stored size at 16, u32 arch at 28, u64 flags at 40 (0x8000: zstd),
u64 inflated size at 56; the payload follows the entry header.
"""

import argparse
import mmap
import struct
import sys

MAGIC = struct.pack("<I", 0xBA55ED50)
ZSTD_BLOCK = 128 * 1024


def zstd_zeros(n, length):
    """A zstd stream of exactly `length` bytes that inflates to n zero bytes, or None if it can't fit."""
    frame = bytearray(b"\x28\xb5\x2f\xfd")  # frame magic
    frame += bytes([0xA0]) + struct.pack("<I", n)  # single segment, 4-byte content size, no checksum
    left = n
    while True:
        size = min(left, ZSTD_BLOCK)
        left -= size
        last = 1 if left == 0 else 0
        frame += struct.pack("<I", last | (1 << 1) | (size << 3))[:3] + b"\0"  # RLE block of zeros
        if last:
            break
    pad = length - len(frame)
    if pad < 8:
        return None
    return bytes(frame) + struct.pack("<II", 0x184D2A50, pad - 8) + bytes(pad - 8)  # skippable frame


FATBIN_SECTIONS = (b".nv_fatbin", b"__nv_relfatbin")


def fatbin_sections(mm):
    """[(offset, size)] of the fat-binary sections (.nv_fatbin, __nv_relfatbin) of a 64-bit LE ELF."""
    if mm[:4] != b"\x7fELF" or mm[4] != 2 or mm[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF")
    (shoff,) = struct.unpack_from("<Q", mm, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", mm, 0x3A)
    (str_off,) = struct.unpack_from("<Q", mm, shoff + shstrndx * shentsize + 0x18)
    found = []
    for i in range(shnum):
        base = shoff + i * shentsize
        (name_idx,) = struct.unpack_from("<I", mm, base)
        end = mm.find(b"\0", str_off + name_idx)
        if mm[str_off + name_idx : end] in FATBIN_SECTIONS:
            found.append(struct.unpack_from("<QQ", mm, base + 0x18))
    return found


def prune(path, keep_arch):
    stats = {"kept": 0, "zeroed": 0, "bytes_zeroed": 0, "bytes_kept": 0}
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        for off, size in fatbin_sections(mm):
            prune_section(mm, off, off + size, keep_arch, stats, path)
        mm.flush()
    return stats


def prune_section(mm, pos, end, keep_arch, stats, path):
    while (pos := mm.find(MAGIC, pos, end)) >= 0:
        _, _, hsize, fsize = struct.unpack_from("<IHHQ", mm, pos)
        e, cend = pos + hsize, pos + hsize + fsize
        if cend > end or hsize != 16:
            raise ValueError(f"{path}: bad fat binary container at {pos:#x}")
        while e + 64 <= cend:
            kind, _, ehsize, psize = struct.unpack_from("<HHIQ", mm, e)
            if ehsize == 0:
                break
            stored, _, _, arch = struct.unpack_from("<IIII", mm, e + 16)
            flags, _, inflated = struct.unpack_from("<QQQ", mm, e + 40)
            data, nxt = e + ehsize, e + ehsize + psize
            if nxt > cend or stored > psize:
                raise ValueError(f"{path}: bad fat binary entry at {e:#x}")
            drop = (kind in (2, 0x10) and arch != keep_arch) or (kind == 1 and arch > keep_arch)
            new = (zstd_zeros(inflated, stored) if flags & 0x8000 else bytes(stored)) if drop else None
            if new is not None:
                mm[data:nxt] = new + bytes(psize - stored)
            key = "zeroed" if new is not None else "kept"
            stats[key] += 1
            stats["bytes_" + key] += psize
            e = nxt
        pos = cend


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("libs", nargs="+")
    args = ap.parse_args()
    for lib in args.libs:
        s = prune(lib, args.arch)
        if s["kept"] + s["zeroed"]:
            print(
                f"{lib}: kept {s['kept']} entries ({s['bytes_kept'] / 1e6:.1f} MB), "
                f"zeroed {s['zeroed']} ({s['bytes_zeroed'] / 1e6:.1f} MB)",
                file=sys.stderr,
            )


if __name__ == "__main__":
    main()
