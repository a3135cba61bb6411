"""The host program of tests/test_cuda_emulated.py, run as a child process: loads the emulated
kernels' library and makes the calls that a JSON job on stdin lists, on buffers kept in a file.

Job: {"library": path, "arena": path, "calls": [[function, [kind, value...], ...], ...]}, kinds
"buffer" (offset and size in the arena file, and the byte shift of the pointer passed), "int",
"float" and "null". Every buffer is copied into a malloc'd block of exactly its size, as a
cudaMemcpy to the device would, so that AddressSanitizer (preloaded by the test) guards its
bounds, and copied back after the call.
Prints the calls' return values as a JSON list. A child process, so that a hang ends in the test's
timeout and a crash or a sanitizer report in an exit status, never in the test process itself.
"""

import ctypes
import json
import os
import sys


def main() -> None:
    job = json.load(sys.stdin)
    library = ctypes.CDLL(job["library"])
    libc = ctypes.CDLL(None)  # malloc and free as the preloaded AddressSanitizer intercepts them
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    fd = os.open(job["arena"], os.O_RDWR)
    results = []
    for name, *args in job["calls"]:
        values, buffers = [], []
        for kind, *value in args:
            if kind == "buffer":
                offset, size, shift = value
                address = libc.malloc(size)
                ctypes.memmove(address, os.pread(fd, size, offset), size)
                buffers.append((address, offset, size))
                values.append(ctypes.c_void_p(address + shift))
            elif kind == "int":
                values.append(ctypes.c_int64(value[0]))
            elif kind == "float":
                values.append(ctypes.c_double(value[0]))
            else:
                values.append(ctypes.c_void_p(None))
        results.append(getattr(library, name)(*values))
        for address, offset, size in buffers:
            os.pwrite(fd, ctypes.string_at(address, size), offset)
            libc.free(address)
    os.close(fd)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
