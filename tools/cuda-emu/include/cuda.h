// tools/cuda-emu: stands in for CUDA's <cuda.h> (the driver API types) when GEMMA3_CUDA_EMU=ON (see cuda_emu.h).
#pragma once
#include "../cuda_emu.h"
