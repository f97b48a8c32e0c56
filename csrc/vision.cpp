// Python module pydetectron._C. The ops themselves are registered with the torch dispatcher
// (see ops_registry.cpp and the per-device kernels in cpu/ and cuda/), so they are reached as
// torch.ops.pydetectron.<name>; importing this module is what loads the registrations.
#include <torch/extension.h>

static bool with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("with_cuda", &with_cuda, "True when the extension was built with its CUDA kernels");
}
