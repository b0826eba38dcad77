#!/usr/bin/env python3
"""A `process` command for renderq: writes a gradient PNG.

    gradient.py WIDTH HEIGHT FRAME OUT.png

Reports progress with Open Job Description stdout lines, which renderq reads:
`openjd_progress: 50` and `openjd_status: ...`.
"""

import struct
import sys
import zlib


def main():
    width, height, frame, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(f"openjd_status: rendering frame {frame}", flush=True)
    rows = []
    for y in range(height):
        row = bytearray()
        for x in range(width):
            row += bytes(((x * 255 // max(width - 1, 1) + frame * 9) % 256, y * 255 // max(height - 1, 1), 128))
        rows.append(b"\x00" + bytes(row))
        if y % max(height // 4, 1) == 0:
            print(f"openjd_progress: {100.0 * y / height:.1f}", flush=True)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(out, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(b"".join(rows))))
        f.write(chunk(b"IEND", b""))
    print("openjd_progress: 100", flush=True)


if __name__ == "__main__":
    main()
