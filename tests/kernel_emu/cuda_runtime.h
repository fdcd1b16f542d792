// Stand-in for the CUDA toolkit header when the kernel is compiled for the host (see cuda_emu.h).
#include "cuda_emu.h"
