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

static struct PyModuleDef capture_module = {
    PyModuleDef_HEAD_INIT, "mtpcode._capture",
    "The trunk-capture eval callback for llama.cpp, in C (see mtpcode.llama.TrunkCapture).",
    -1, NULL, NULL, NULL, NULL, NULL,
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
