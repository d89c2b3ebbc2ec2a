// vitkernels — Python module entry point for the compiled extension.
//
// The ops register themselves with the torch dispatcher from static initialisers
// (TORCH_LIBRARY in attention.cpp etc.), so the module itself is empty: `import vitkernels._C`
// just loads the shared library. CMake builds (a plain shared library loaded with
// torch.ops.load_library) do not compile this file; setup.py defines
// VITKERNELS_BUILD_PYTHON_MODULE and TORCH_EXTENSION_NAME (= _C).
#ifdef VITKERNELS_BUILD_PYTHON_MODULE

#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

#define VK_CONCAT_(a, b) a##b
#define VK_CONCAT(a, b) VK_CONCAT_(a, b)
#define VK_STR_(x) #x
#define VK_STR(x) VK_STR_(x)

static struct PyModuleDef vitkernels_module_def = {
    PyModuleDef_HEAD_INIT,
    VK_STR(TORCH_EXTENSION_NAME),                                             /* m_name */
    "vitkernels compiled CUDA ops (registered under torch.ops.vitkernels_C)", /* m_doc */
    -1,                                                                       /* m_size */
    nullptr,                                                                  /* m_methods */
    nullptr,                                                                  /* m_slots */
    nullptr,                                                                  /* m_traverse */
    nullptr,                                                                  /* m_clear */
    nullptr,                                                                  /* m_free */
};

PyMODINIT_FUNC VK_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&vitkernels_module_def); }

#endif  // VITKERNELS_BUILD_PYTHON_MODULE
