// An empty Python module named TORCH_EXTENSION_NAME (_C from setup.py, glow_ext_jit just in time):
// importing it loads this shared library, whose TORCH_LIBRARY blocks register the ops. It uses
// CPython's limited API only (PyModule_Create, stable since 3.2), so one build serves every CPython
// the wheel's abi3 tag admits.
#ifndef Py_LIMITED_API
// torch >= 2.7 defines it for py_limited_api=True extensions; older torch and the JIT build do not.
#define Py_LIMITED_API 0x03090000
#endif
#include <Python.h>

#define GLOW_EXT_PASTE(a, b) a##b
#define GLOW_EXT_INIT_FUNCTION(name) GLOW_EXT_PASTE(PyInit_, name)
#define GLOW_EXT_QUOTE(name) #name
#define GLOW_EXT_NAME_STRING(name) GLOW_EXT_QUOTE(name)

PyMODINIT_FUNC GLOW_EXT_INIT_FUNCTION(TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, GLOW_EXT_NAME_STRING(TORCH_EXTENSION_NAME),
                               "glow_ext compiled kernels; the ops themselves live in torch.ops.glow_ext",
                               -1, nullptr};
  return PyModule_Create(&module);
}
