/* derpd._speedups: the relay's per-packet work in C (optional).
 *
 * Functions that do exactly what their pure-Python twins do, only faster; callers pick
 * this module when it was built and DERPD_PURE is not set (derpd/accel.py), and
 * tests/derpd/test_speedups.py checks that both give identical results.
 *
 *   split_frames(buf, pos, limits, max_unknown, most)
 *       -> (frames, pos, skipped, skip, bad_type, bad_len)
 *     The loop of FrameDecoder.frames (derpd/protocol/frames.py): every complete frame of
 *     buf[pos:] as (type, payload) tuples, at most ``most`` (-1: all).  ``limits`` is a
 *     256-tuple: the payload limit of each frame type, or None for a type that is skipped.
 *     ``max_unknown`` is -1 for "skip any length".  Returns the position after the last
 *     consumed byte, the number of whole unknown frames skipped, and the bytes of a partly
 *     received unknown frame still to skip.  A frame longer than allowed stops the loop
 *     with pos at its header and bad_type >= 0 (the caller raises; nothing else raises).
 *
 *   route_packets(frames, start, active, src, watch, disco_magic, disco_min_len)
 *       -> (index, packets, bytes, disco, full)
 *     A declared acceleration of the SendPacket case of route() in derpd/relay/router.py
 *     (tests/derpd/test_router.py holds both to one reference model): from frames[start]
 *     on, every SendPacket whose destination is in ``active`` becomes one RecvPacket frame
 *     (header, src, packet; one allocation) handed to ``active[dst].enqueue(frame, disco)``;
 *     a destination whose ``saw_src`` set lacks src is first passed to ``watch(dst_conn,
 *     src)`` (PeerGone bookkeeping).  Stops at the
 *     first frame it does not handle (another type, a payload shorter than a key, an unknown
 *     destination) or after an enqueue that returns True (full = 1); ``index`` is the frame
 *     to resume at.  The callbacks may do anything, ``frames`` and ``active`` included (no
 *     borrowed reference is held across them); route_packets keeps no state between calls,
 *     so calling it again from a callback is safe too.
 *
 *   box_key(shared)
 *     NaCl's crypto_box key from an X25519 shared secret: HSalsa20 of the 32-byte secret with
 *     a zero 16-byte input and the "expand 32-byte k" constants (what crypto_box_beforenm does
 *     after the scalar multiplication).  derpd/keys.py does the multiplication with OpenSSL
 *     (via cryptography) when this function is there.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define HEADER_LEN 5
#define KEY_LEN 32

/* Module state (multi-phase init: one per module object): two interned attribute names. */
typedef struct {
    PyObject *str_enqueue, *str_saw_src;
} sp_state;

static PyObject *
split_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 256) {
        PyErr_SetString(PyExc_TypeError, "split_frames(bytes, int, 256-tuple, int, int)");
        return NULL;
    }
    PyObject *bufobj = args[0], *limits = args[2];
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long long max_unknown = PyLong_AsLongLong(args[3]);
    Py_ssize_t most = PyLong_AsSsize_t(args[4]);
    if (PyErr_Occurred())
        return NULL;
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(bufobj);
    Py_ssize_t end = PyBytes_GET_SIZE(bufobj);
    long long skipped = 0, skip = 0;
    int bad_type = -1;
    long long bad_len = 0;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (pos < 0 || pos > end)
        pos = end;
    while (end - pos >= HEADER_LEN && most != 0) {
        int ftype = buf[pos];
        unsigned long long n = ((unsigned long long)buf[pos + 1] << 24) | ((unsigned long long)buf[pos + 2] << 16)
                               | ((unsigned long long)buf[pos + 3] << 8) | (unsigned long long)buf[pos + 4];
        PyObject *limit = PyTuple_GET_ITEM(limits, ftype);
        if (limit == Py_None) {
            if (max_unknown >= 0 && n > (unsigned long long)max_unknown) {
                bad_type = ftype;
                bad_len = (long long)n;
                break;
            }
            unsigned long long avail = (unsigned long long)(end - pos - HEADER_LEN);
            if (avail >= n) {
                pos += HEADER_LEN + (Py_ssize_t)n;
                skipped++;
                continue;
            }
            skip = (long long)(n - avail);
            pos = end;
            break;
        }
        long long lim = PyLong_AsLongLong(limit);
        if (lim == -1 && PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
        }
        if ((long long)n > lim) {
            bad_type = ftype;
            bad_len = (long long)n;
            break;
        }
        Py_ssize_t start = pos + HEADER_LEN;
        if ((unsigned long long)(end - start) < n)
            break;
        PyObject *payload = PyBytes_FromStringAndSize((const char *)buf + start, (Py_ssize_t)n);
        if (payload == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyObject *item = PyTuple_New(2);
        PyObject *t = PyLong_FromLong(ftype);
        if (item == NULL || t == NULL) {
            Py_XDECREF(item);
            Py_XDECREF(t);
            Py_DECREF(payload);
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(item, 0, t);
        PyTuple_SET_ITEM(item, 1, payload);
        if (PyList_Append(out, item) < 0) {
            Py_DECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
        pos = start + (Py_ssize_t)n;
        most--;
    }
    return Py_BuildValue("(NnLLiL)", out, pos, skipped, skip, bad_type, bad_len);
}

static PyObject *
route_packets(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyList_Check(args[0]) || !PyDict_Check(args[2]) || !PyBytes_Check(args[3])
        || PyBytes_GET_SIZE(args[3]) != KEY_LEN || !PyBytes_Check(args[5])) {
        PyErr_SetString(PyExc_TypeError, "route_packets(list, int, dict, 32 bytes, callable, bytes, int)");
        return NULL;
    }
    PyObject *frames = args[0], *active = args[2], *srcobj = args[3], *watch = args[4], *magic = args[5];
    const char *src = PyBytes_AS_STRING(args[3]);
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    Py_ssize_t disco_min = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred())
        return NULL;
    sp_state *st = PyModule_GetState(self);
    const char *mag = PyBytes_AS_STRING(magic);
    Py_ssize_t maglen = PyBytes_GET_SIZE(magic);
    Py_ssize_t npk = 0, nbytes = 0, ndisco = 0;
    int full = 0;
    /* The callbacks (saw_src, watch, enqueue) run Python, which may change ``frames``: the
     * list's size is read again for every frame, and the frame's tuple (so its payload) is
     * held with a reference of our own until the frame is done. */
    while (i >= 0 && i < PyList_GET_SIZE(frames)) {
        PyObject *item = PyList_GET_ITEM(frames, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2)
            break;
        PyObject *t = PyTuple_GET_ITEM(item, 0), *payload = PyTuple_GET_ITEM(item, 1);
        if (!PyLong_Check(t) || PyLong_AsLong(t) != 4 || !PyBytes_Check(payload))
            break;
        Py_ssize_t n = PyBytes_GET_SIZE(payload);
        if (n < KEY_LEN)
            break;
        Py_INCREF(item);
        const char *p = PyBytes_AS_STRING(payload);
        PyObject *dst = PyBytes_FromStringAndSize(p, KEY_LEN);
        if (dst == NULL) {
            Py_DECREF(item);
            return NULL;
        }
        PyObject *conn = PyDict_GetItemWithError(active, dst);
        if (conn == NULL) {
            Py_DECREF(dst);
            Py_DECREF(item);
            if (PyErr_Occurred())
                return NULL;
            break;
        }
        Py_INCREF(conn);
        int disco = n >= KEY_LEN + disco_min && n - KEY_LEN >= maglen && memcmp(p + KEY_LEN, mag, (size_t)maglen) == 0;
        Py_DECREF(dst);
        PyObject *saw = PyObject_GetAttr(conn, st->str_saw_src);
        int seen = saw == NULL ? -1 : PySet_Contains(saw, srcobj);
        Py_XDECREF(saw);
        if (seen == 0) {
            PyObject *wargs[2] = {conn, srcobj};
            PyObject *w = PyObject_Vectorcall(watch, wargs, 2, NULL);
            if (w == NULL)
                seen = -1;
            Py_XDECREF(w);
        }
        if (seen < 0) {
            Py_DECREF(conn);
            Py_DECREF(item);
            return NULL;
        }
        PyObject *frame = PyBytes_FromStringAndSize(NULL, HEADER_LEN + n);
        if (frame == NULL) {
            Py_DECREF(conn);
            Py_DECREF(item);
            return NULL;
        }
        unsigned char *f = (unsigned char *)PyBytes_AS_STRING(frame);
        f[0] = 5;
        f[1] = (unsigned char)((size_t)n >> 24);
        f[2] = (unsigned char)((size_t)n >> 16);
        f[3] = (unsigned char)((size_t)n >> 8);
        f[4] = (unsigned char)n;
        memcpy(f + HEADER_LEN, src, KEY_LEN);
        memcpy(f + HEADER_LEN + KEY_LEN, p + KEY_LEN, (size_t)(n - KEY_LEN));
        Py_DECREF(item);
        npk++;
        nbytes += n - KEY_LEN;
        ndisco += disco;
        i++;
        PyObject *callargs[3] = {conn, frame, disco ? Py_True : Py_False};
        PyObject *r = PyObject_VectorcallMethod(st->str_enqueue, callargs, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_DECREF(frame);
        Py_DECREF(conn);
        if (r == NULL)
            return NULL;
        int now_full = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (now_full < 0)
            return NULL;
        if (now_full) {
            full = 1;
            break;
        }
    }
    return Py_BuildValue("(nnnni)", i, npk, nbytes, ndisco, full);
}

static inline uint32_t
load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void
store_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

#define ROTL32(v, n) (((v) << (n)) | ((v) >> (32 - (n))))
#define QUARTER(a, b, c, d)         \
    do {                            \
        b ^= ROTL32(a + d, 7);      \
        c ^= ROTL32(b + a, 9);      \
        d ^= ROTL32(c + b, 13);     \
        a ^= ROTL32(d + c, 18);     \
    } while (0)

static PyObject *
box_key(PyObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len != KEY_LEN) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "box_key needs a 32-byte shared secret");
        return NULL;
    }
    const unsigned char *k = (const unsigned char *)view.buf;
    /* The Salsa20 state: constants on the diagonal, the key around them, the input (zero). */
    uint32_t x[16];
    x[0] = 0x61707865;  /* "expa" */
    x[5] = 0x3320646e;  /* "nd 3" */
    x[10] = 0x79622d32; /* "2-by" */
    x[15] = 0x6b206574; /* "te k" */
    for (int i = 0; i < 4; i++) {
        x[1 + i] = load_le32(k + 4 * i);
        x[11 + i] = load_le32(k + 16 + 4 * i);
        x[6 + i] = 0;
    }
    PyBuffer_Release(&view);
    for (int r = 0; r < 20; r += 2) {
        /* column round */
        QUARTER(x[0], x[4], x[8], x[12]);
        QUARTER(x[5], x[9], x[13], x[1]);
        QUARTER(x[10], x[14], x[2], x[6]);
        QUARTER(x[15], x[3], x[7], x[11]);
        /* row round */
        QUARTER(x[0], x[1], x[2], x[3]);
        QUARTER(x[5], x[6], x[7], x[4]);
        QUARTER(x[10], x[11], x[8], x[9]);
        QUARTER(x[15], x[12], x[13], x[14]);
    }
    /* HSalsa20 keeps the diagonal and the input words, without the final addition. */
    static const int pick[8] = {0, 5, 10, 15, 6, 7, 8, 9};
    unsigned char out[KEY_LEN];
    for (int i = 0; i < 8; i++)
        store_le32(out + 4 * i, x[pick[i]]);
    return PyBytes_FromStringAndSize((const char *)out, KEY_LEN);
}

static PyMethodDef methods[] = {
    {"box_key", box_key, METH_O, "box_key(shared) -> the crypto_box key (HSalsa20, zero input)"},
    {"split_frames", (PyCFunction)(void (*)(void))split_frames, METH_FASTCALL,
     "split_frames(buf, pos, limits, max_unknown, most) -> (frames, pos, skipped, skip, bad_type, bad_len)"},
    {"route_packets", (PyCFunction)(void (*)(void))route_packets, METH_FASTCALL,
     "route_packets(frames, start, active, src, watch, magic, min_len) -> (index, packets, bytes, disco, full)"},
    {NULL, NULL, 0, NULL},
};

static int
sp_exec(PyObject *m)
{
    sp_state *st = PyModule_GetState(m);
    st->str_enqueue = PyUnicode_InternFromString("enqueue");
    st->str_saw_src = PyUnicode_InternFromString("saw_src");
    return st->str_enqueue == NULL || st->str_saw_src == NULL ? -1 : 0;
}

static int
sp_traverse(PyObject *m, visitproc visit, void *arg)
{
    sp_state *st = PyModule_GetState(m);
    Py_VISIT(st->str_enqueue);
    Py_VISIT(st->str_saw_src);
    return 0;
}

static int
sp_clear(PyObject *m)
{
    sp_state *st = PyModule_GetState(m);
    Py_CLEAR(st->str_enqueue);
    Py_CLEAR(st->str_saw_src);
    return 0;
}

static void
sp_free(void *m)
{
    sp_clear((PyObject *)m);
}

static PyModuleDef_Slot sp_slots[] = {
    {Py_mod_exec, sp_exec},
#ifdef Py_mod_gil
    /* split_frames and box_key would not need it; route_packets calls back into Python
     * objects (dicts, sets, connections) that the relay shares without locks */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "derpd._speedups",
    .m_size = sizeof(sp_state),
    .m_methods = methods,
    .m_slots = sp_slots,
    .m_traverse = sp_traverse,
    .m_clear = sp_clear,
    .m_free = sp_free,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&module);
}
