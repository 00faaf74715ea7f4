"""The native kernels must build wherever a C++ compiler is present: test_kernels skips when
they are unavailable, so a build error on some CPU (as once for hosts without AVX512-BF16)
would otherwise pass unnoticed and leave decode on the slow torch path."""

import os
import platform
import shutil

import pytest

from ossrt.model import kernels


@pytest.mark.skipif(shutil.which("c++") is None or os.environ.get("OSSRT_NO_KERNELS") == "1",
                    reason="no C++ compiler, or kernels switched off")
def test_kernels_build_where_a_compiler_exists() -> None:
    assert kernels.available()
    if platform.machine() in ("x86_64", "AMD64"):
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        want = "avx512bf16" if " avx512_bf16" in flags else ("avx2" if " avx2" in flags else "")
        if want:
            assert kernels.isa() == want
