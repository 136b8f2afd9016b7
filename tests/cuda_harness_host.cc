// The device harness (cuda_harness.cu) built by the host compiler: the CUDA
// bodies run on the CPU in the GPU's launch geometry. A file of its own
// because CMake gives a source file one language per directory.
#define LMCONV_HARNESS_HOST 1
#include "cuda_harness.cu"  // NOLINT(build/include): one source, two builds
