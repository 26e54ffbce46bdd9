"""The CUDA sources compile with this machine's nvcc (no GPU needed), so a syntax error never reaches main."""

import shutil
import subprocess

import pytest
from torch.utils import cpp_extension

from blocks.wkv_cuda import SOURCES, _wheel_cuda_includes

nvcc = shutil.which("nvcc")


@pytest.mark.skipif(nvcc is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(source, tmp_path):
    includes = cpp_extension.include_paths(device_type="cuda") + _wheel_cuda_includes()
    command = [nvcc, "-std=c++20", "-c", str(source), "-o", str(tmp_path / "out.o"), "-Xcompiler", "-fPIC",
               "-gencode=arch=compute_90,code=sm_90", *cpp_extension.COMMON_NVCC_FLAGS,
               *(f"-I{p}" for p in includes)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out.o").stat().st_size > 0
