// Reading one local variable of running Python frames without building their f_locals dicts.
//
// The modules in call are the `self` local of each Module._call_impl frame on the stack, read
// where a block is about to refuse a write into memory from before it (is it module state?)
// and where clone mode asks whether an argument may be handed over. `frame.f_locals` copies
// every local of a frame into a dict: ~1 us a frame. Here the one slot is read from the
// interpreter's own frame record, which only CPython 3.11's internal headers describe; on any
// other version the answer is "unknown" and Python reads f_locals.
// A translation unit of its own: Py_BUILD_CORE must not reach the torch headers.
#define Py_BUILD_CORE
#include <Python.h>

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
#include <internal/pycore_code.h>
#include <internal/pycore_frame.h>
#define IMMUTORCH_FRAME_LOCALS 1
#endif

#include <cstddef>

#ifdef IMMUTORCH_FRAME_LOCALS
namespace {

// The slot of local `name` in `code`, or -1; found once per (code, name). The codes asked
// about are few and fixed (Module._call_impl's, held by guard.cpp), and the GIL guards the
// cache.
Py_ssize_t slot_of(PyCodeObject* code, PyObject* name) {
  struct Seen {
    PyCodeObject* code;
    PyObject* name;
    Py_ssize_t slot;
  };
  static Seen seen[8];
  static size_t used = 0;
  for (size_t i = 0; i < used; ++i) {
    if (seen[i].code == code && seen[i].name == name) return seen[i].slot;
  }
  Py_ssize_t slot = -1;
  PyObject* names = code->co_localsplusnames;
  for (Py_ssize_t i = 0, n = PyTuple_GET_SIZE(names); i < n && slot < 0; ++i) {
    PyObject* each = PyTuple_GET_ITEM(names, i);
    if (each == name || PyUnicode_Compare(each, name) == 0) slot = i;
  }
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return -1;
  }
  if (used < 8) seen[used++] = Seen{code, name, slot};
  return slot;
}

// The value (borrowed) of local `name` in `frame`, or nullptr where it is unbound.
PyObject* local_of(_PyInterpreterFrame* frame, PyObject* name) {
  PyCodeObject* code = frame->f_code;
  Py_ssize_t slot = slot_of(code, name);
  if (slot < 0) return nullptr;
  PyObject* value = frame->localsplus[slot];
  if (value != nullptr && (_PyLocals_GetKind(code->co_localspluskinds, static_cast<int>(slot)) &
                           (CO_FAST_CELL | CO_FAST_FREE))) {
    // A cell (kwargs and self are shared with `inner`); MAKE_CELL and COPY_FREE_VARS ran at
    // the frame's start, before any call it makes.
    value = PyCell_Check(value) ? PyCell_GET(value) : nullptr;
  }
  return value;
}

}  // namespace
#endif

// Appends to the list `out` the value of local `name` in each frame of this thread's Python
// stack that runs `code`, innermost first (unbound ones left out). 0 on success; -1, with
// nothing appended and no error set, on a Python whose frames this does not know; -2 with a
// Python error set. Called with the GIL.
int immutorch_locals_on_stack(PyObject* code, PyObject* name, PyObject* out) {
#ifdef IMMUTORCH_FRAME_LOCALS
  for (_PyInterpreterFrame* frame = PyThreadState_Get()->cframe->current_frame; frame != nullptr;
       frame = frame->previous) {
    if (reinterpret_cast<PyObject*>(frame->f_code) != code || _PyFrame_IsIncomplete(frame)) {
      continue;
    }
    PyObject* value = local_of(frame, name);
    if (value != nullptr && PyList_Append(out, value) < 0) return -2;
  }
  return 0;
#else
  (void)code;
  (void)name;
  (void)out;
  return -1;
#endif
}
