// tools/cuda-emu: stands in for CUB's <cub/device/device_radix_sort.cuh> when
// GEMMA3_CUDA_EMU=ON (see cuda_emu.h).
#pragma once
#include "../../../cuda_emu.h"
