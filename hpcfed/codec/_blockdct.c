/* One fused pass of the 8 x 8 block DCT for the CPU encode (see dct.py: forward_fused).

   For every 64-value block x (read row-major as 8 x 8): Y = C X C^T with the orthonormal DCT-II matrix C,
   written to (or, with add, added to) the matching block of out; energy (optional) += Y*Y; values (optional)
   receives out at the given sorted positions; the return value is the sum of Y*Y over all blocks. The
   separable passes run in registers, eight lanes wide (GCC/Clang vector extensions), the column pass on the
   even/odd halves (C[k][7-r] = (-1)^k C[k][r]): 96 multiply-adds a block against 4096 for the 64 x 64
   Kronecker GEMM, and the residual add, the energy update and the sum of squares ride on the same pass
   instead of three more over memory. On x86-64 Linux with GCC, clones for x86-64-v4 (AVX-512: 32 vector
   registers, no spills) and x86-64-v3 (AVX2 + FMA) are chosen at load time (isa() says which). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

typedef float v8f __attribute__((vector_size(32), aligned(4)));

static float dct_c[8][8];   /* dct_c[k][i] = C[k][i] */

static void init_matrix(void) {
    for (int k = 0; k < 8; k++) {
        for (int i = 0; i < 8; i++) {
            double c = sqrt(2.0 / 8.0) * cos(M_PI * (2 * i + 1) * k / 16.0);
            dct_c[k][i] = (float)(k == 0 ? c / sqrt(2.0) : c);
        }
    }
}

/* Where GCC can pick a clone at load time (ifunc): x86-64 Linux */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define HAS_CLONES 1
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HAS_CLONES 0
#define CLONES
#endif

CLONES
static double forward_blocks(const float *g, float *out, float *energy, Py_ssize_t n_blocks, int add) {
    v8f col[8];   /* col[i][k] = C[k][i]: the row pass is sum_i x[r][i] * col[i] */
    for (int i = 0; i < 8; i++)
        for (int k = 0; k < 8; k++)
            col[i][k] = dct_c[k][i];
    double total = 0.0;
    for (Py_ssize_t b = 0; b < n_blocks; b++) {
        const float *x = g + 64 * b;
        v8f rows[8];
        for (int r = 0; r < 8; r++) {
            v8f acc = col[0] * x[8 * r];
            for (int i = 1; i < 8; i++)
                acc += col[i] * x[8 * r + i];
            rows[r] = acc;
        }
        v8f halves[8];   /* rows r + (7 - r), then rows r - (7 - r), r < 4 */
        for (int r = 0; r < 4; r++) {
            halves[r] = rows[r] + rows[7 - r];
            halves[4 + r] = rows[r] - rows[7 - r];
        }
        v8f squares = {0};
        for (int k = 0; k < 8; k++) {
            const v8f *h = (k & 1) ? halves + 4 : halves;
            v8f y = h[0] * dct_c[k][0] + h[1] * dct_c[k][1] + h[2] * dct_c[k][2] + h[3] * dct_c[k][3];
            v8f *o = (v8f *)(out + 64 * b + 8 * k);
            if (add)
                y += *o;
            *o = y;
            squares += y * y;
            if (energy) {
                v8f *e = (v8f *)(energy + 64 * b + 8 * k);
                *e += y * y;
            }
        }
        float s = 0.0f;
        for (int l = 0; l < 8; l++)
            s += squares[l];
        total += s;
    }
    return total;
}

/* values[j] = out[positions[j]]; -1 (nothing written) if a position is outside out. */
static int gather(const float *out, Py_ssize_t n, const long long *positions, float *values, Py_ssize_t m) {
    for (Py_ssize_t j = 0; j < m; j++) {
        if (positions[j] < 0 || positions[j] >= n)
            return -1;
    }
    for (Py_ssize_t j = 0; j < m; j++)
        values[j] = out[positions[j]];
    return 0;
}

static PyObject *forward_fused(PyObject *self, PyObject *args) {
    PyObject *objs[5];   /* grad, out, energy, positions, values */
    int add;
    if (!PyArg_ParseTuple(args, "OOOpOO", &objs[0], &objs[1], &objs[2], &add, &objs[3], &objs[4]))
        return NULL;
    static const char *names[5] = {"grad", "out", "energy", "positions", "values"};
    Py_buffer views[5] = {{0}};
    int acquired[5] = {0}, gathered = 0;
    Py_ssize_t n = 0, m = 0;
    double total = 0.0;
    PyObject *result = NULL;
    for (int i = 0; i < 5; i++) {
        if (i >= 2 && objs[i] == Py_None)
            continue;
        int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (i == 0 || i == 3 ? 0 : PyBUF_WRITABLE);
        if (PyObject_GetBuffer(objs[i], &views[i], flags) != 0)
            goto done;
        acquired[i] = 1;
        const char *format = views[i].format ? views[i].format : "";
        int ok = i == 3 ? views[i].itemsize == 8 && (!strcmp(format, "l") || !strcmp(format, "q"))
                        : views[i].itemsize == 4 && !strcmp(format, "f");
        if (!ok) {
            PyErr_Format(PyExc_TypeError, "forward_fused: %s must be %s", names[i], i == 3 ? "int64" : "float32");
            goto done;
        }
    }
    n = views[0].len / 4;
    m = views[3].len / 8;
    if (n % 64 != 0 || views[1].len != views[0].len || (acquired[2] && views[2].len != views[0].len)) {
        PyErr_Format(PyExc_ValueError, "forward_fused: grad, out and energy need the same length, a multiple "
                     "of 64 (grad has %zd values)", n);
        goto done;
    }
    if (acquired[3] != acquired[4] || views[4].len / 4 != m) {
        PyErr_SetString(PyExc_ValueError, "forward_fused: positions and values go together, one length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    total = forward_blocks(views[0].buf, views[1].buf, acquired[2] ? views[2].buf : NULL, n / 64, add);
    gathered = gather(views[1].buf, n, views[3].buf, views[4].buf, m);
    Py_END_ALLOW_THREADS
    if (gathered != 0)
        PyErr_Format(PyExc_ValueError, "forward_fused: a position is outside the %zd values", n);
    else
        result = PyFloat_FromDouble(total);
done:
    for (int i = 0; i < 5; i++) {
        if (acquired[i])
            PyBuffer_Release(&views[i]);
    }
    return result;
}

static PyObject *isa(PyObject *self, PyObject *unused) {
#if HAS_CLONES
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4"))
        return PyUnicode_FromString("x86-64-v4");
    if (__builtin_cpu_supports("x86-64-v3"))
        return PyUnicode_FromString("x86-64-v3");
#endif
    return PyUnicode_FromString("baseline");
}

static PyMethodDef methods[] = {
    {"forward_fused", forward_fused, METH_VARARGS,
     "forward_fused(grad, out, energy, add, positions, values) -> sum of squares: out (+)= 8x8 block DCT of grad; "
     "energy += out**2 unless energy is None (float32, C-contiguous, one length, a multiple of 64); "
     "values = out[positions] unless both are None (int64 positions)."},
    {"isa", isa, METH_NOARGS, "The instruction set the pass runs with: 'x86-64-v4', 'x86-64-v3' or 'baseline'."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_blockdct", "Fused 8 x 8 block DCT pass (CPU).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__blockdct(void) {
    init_matrix();
    return PyModule_Create(&module);
}
