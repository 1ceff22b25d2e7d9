/*
 * The trunk-capture eval callback in C.
 *
 * llama.cpp calls a context's eval callback for every node of every graph it
 * computes (ask=true: "do you want this node?") and again once a wanted node
 * is computed (ask=false). mtpcode wants exactly one node per forward, the
 * trunk output, and copies its rows out. Done in Python, the per-node calls
 * cost about a third of a small model's forward; here they cost a string
 * compare.
 *
 * No ggml headers are needed: the ggml functions used are passed in as
 * pointers (resolved by mtpcode.llama from llama-cpp-python's libggml-base),
 * so this module links against nothing but Python. The struct layout must
 * match mtpcode.llama._NativeCapture.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

struct mtp_capture {
    const char *(*get_name)(const void *tensor);
    int64_t (*nrows)(const void *tensor);
    size_t (*nbytes)(const void *tensor);
    size_t (*element_size)(const void *tensor);
    void (*tensor_get)(const void *tensor, void *data, size_t offset, size_t size);
    char *dst;          /* base of a C-contiguous float32 array of `capacity` rows */
    int64_t row_bytes;  /* bytes of one row of dst */
    int64_t capacity;   /* rows of dst */
    int64_t write_pos;  /* row of dst the next captured rows go to */
    int64_t rows_seen;  /* rows of the last wanted tensor (for error messages) */
    int32_t error;      /* MTP_CAPTURE_* */
    char name[64];      /* the wanted tensor, NUL-terminated */
    int32_t active;     /* 0: want nothing (the forward then runs as one graph compute) */
};

enum { MTP_CAPTURE_OK = 0, MTP_CAPTURE_BAD_TENSOR = 1, MTP_CAPTURE_OVERFLOW = 2 };

static bool mtp_capture_eval(void *tensor, bool ask, void *user_data)
{
    struct mtp_capture *c = (struct mtp_capture *)user_data;
    if (!c->active)
        return false;
    const char *name = c->get_name(tensor);
    if (name == NULL || strcmp(name, c->name) != 0)
        return false;
    if (ask)
        return true;
    int64_t rows = c->nrows(tensor);
    c->rows_seen = rows;
    if (c->element_size(tensor) != 4 || rows <= 0 || (int64_t)c->nbytes(tensor) != rows * c->row_bytes) {
        c->error = MTP_CAPTURE_BAD_TENSOR;
        return true;
    }
    if (c->write_pos + rows > c->capacity) {
        c->error = MTP_CAPTURE_OVERFLOW;
        return true;
    }
    c->tensor_get(tensor, c->dst + c->write_pos * c->row_bytes, 0, (size_t)(rows * c->row_bytes));
    c->write_pos += rows;
    return true;
}

/*
 * argmax(get_logits_ith, ctx, i, n_vocab) -> int: the most likely token of the logits of batch
 * row i (the first one on ties, as numpy's argmax and llama.cpp's greedy sampler). Greedy
 * decoding reads one per step right after a forward; in Python that is a ctypes call, an array
 * view and numpy's argmax, on caches the forward has just flushed.
 */
static PyObject *mtp_argmax(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "argmax(get_logits_ith, ctx, i, n_vocab)");
        return NULL;
    }
    float *(*get)(void *, int32_t) = (float *(*)(void *, int32_t))PyLong_AsVoidPtr(args[0]);
    void *ctx = PyLong_AsVoidPtr(args[1]);
    long i = PyLong_AsLong(args[2]);
    Py_ssize_t n = PyLong_AsSsize_t(args[3]);
    if (PyErr_Occurred())
        return NULL;
    if (get == NULL || ctx == NULL || n <= 0) {
        PyErr_SetString(PyExc_ValueError, "argmax: no logits function, context or vocabulary");
        return NULL;
    }
    const float *row = get(ctx, (int32_t)i);
    if (row == NULL) {
        PyErr_Format(PyExc_IndexError, "llama_get_logits_ith(%ld) returned NULL", i);
        return NULL;
    }
    Py_ssize_t best = 0;
    float top = row[0];
    for (Py_ssize_t k = 1; k < n; k++) {
        if (row[k] > top) {
            top = row[k];
            best = k;
        }
    }
    return PyLong_FromSsize_t(best);
}

static PyMethodDef capture_methods[] = {
    {"argmax", (PyCFunction)(void (*)(void))mtp_argmax, METH_FASTCALL,
     "argmax(get_logits_ith, ctx, i, n_vocab): the most likely token of batch row i."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef capture_module = {
    PyModuleDef_HEAD_INIT, "mtpcode._capture",
    "The trunk-capture eval callback for llama.cpp, and a greedy pick, in C (see mtpcode.llama).",
    -1, capture_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__capture(void)
{
    PyObject *m = PyModule_Create(&capture_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "callback_address", PyLong_FromVoidPtr((void *)&mtp_capture_eval)) < 0
        || PyModule_AddIntConstant(m, "struct_size", (long)sizeof(struct mtp_capture)) < 0
        || PyModule_AddIntConstant(m, "BAD_TENSOR", MTP_CAPTURE_BAD_TENSOR) < 0
        || PyModule_AddIntConstant(m, "OVERFLOW", MTP_CAPTURE_OVERFLOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
