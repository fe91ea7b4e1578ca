// tools/cuda-emu: stands in for CUDA's <cuda_runtime.h> when GEMMA3_CUDA_EMU=ON (see cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
