// A minimal CPython module for each compiled library, so Python can import (and thereby load)
// it. Plain CPython rather than pybind11: these modules only carry a few constants, and the
// torch/extension.h include would triple every file's compile time.
#pragma once

#include <Python.h>

#define KDCORE_STRINGIFY_(x) #x
#define KDCORE_STRINGIFY(x) KDCORE_STRINGIFY_(x)
#define KDCORE_CONCAT_(a, b) a##b
#define KDCORE_CONCAT(a, b) KDCORE_CONCAT_(a, b)

// Defines PyInit_<TORCH_EXTENSION_NAME>; `body` receives `PyObject* module` to add attributes to.
#define KDCORE_PYTHON_MODULE(doc, body)                                                    \
  PyMODINIT_FUNC KDCORE_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                      \
    static PyModuleDef definition = {PyModuleDef_HEAD_INIT,                                \
                                     KDCORE_STRINGIFY(TORCH_EXTENSION_NAME), doc, -1};      \
    PyObject* module = PyModule_Create(&definition);                                       \
    if (module == nullptr) return nullptr;                                                 \
    body;                                                                                  \
    return module;                                                                         \
  }
