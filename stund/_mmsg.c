/* stund._mmsg: batched UDP receive and send (Linux recvmmsg(2) / sendmmsg(2)).
 *
 * An optional speed-up for stund/server.py: one system call receives every datagram the
 * socket holds (up to a batch) and one sends every reply.  The decisions stay in Python
 * (stund.binding); this module only moves bytes.  Built by setup.py when a C compiler is
 * there; stund/server.py falls back to recvfrom/sendto without it (or with DERPD_PURE=1).
 *
 *   recv_batch(fd, n) -> list of (data, ip, port, name)
 *       data: the datagram (at most MAX_DATAGRAM bytes, longer ones truncated, as recvfrom);
 *       ip:   the sender's packed address, 4 bytes for IPv4 and for v4-mapped IPv6, else 16;
 *       port: the sender's port;
 *       name: the raw sockaddr, opaque, to hand back to send_batch as the destination.
 *       An empty list when nothing is waiting (EAGAIN).  Other errors raise OSError.
 *   send_batch(fd, items) -> number of datagrams that failed
 *       items: a list of (data, name).  A datagram the kernel refuses is skipped and
 *       counted; the rest are still sent.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef __linux__
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_BATCH 64
#define MAX_DATAGRAM 2048

static char bufs[MAX_BATCH][MAX_DATAGRAM]; /* used only with the GIL held */

static PyObject *
recv_batch(PyObject *self, PyObject *args)
{
    int fd, n;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    struct sockaddr_storage names[MAX_BATCH];

    if (!PyArg_ParseTuple(args, "ii", &fd, &n))
        return NULL;
    if (n < 1)
        n = 1;
    if (n > MAX_BATCH)
        n = MAX_BATCH;
    memset(msgs, 0, sizeof(msgs[0]) * (size_t)n);
    for (int i = 0; i < n; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = MAX_DATAGRAM;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &names[i];
        msgs[i].msg_hdr.msg_namelen = sizeof(names[i]);
    }
    int got = recvmmsg(fd, msgs, (unsigned int)n, MSG_DONTWAIT, NULL);
    if (got < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
            return PyList_New(0);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *out = PyList_New(got);
    if (out == NULL)
        return NULL;
    for (int i = 0; i < got; i++) {
        const struct sockaddr_storage *ss = &names[i];
        const char *ip;
        Py_ssize_t iplen;
        unsigned short port;
        if (ss->ss_family == AF_INET) {
            const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
            ip = (const char *)&a->sin_addr;
            iplen = 4;
            port = ntohs(a->sin_port);
        } else if (ss->ss_family == AF_INET6) {
            const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
            ip = (const char *)&a->sin6_addr;
            iplen = 16;
            if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) {
                ip += 12;
                iplen = 4;
            }
            port = ntohs(a->sin6_port);
        } else {
            ip = "";
            iplen = 0;
            port = 0;
        }
        PyObject *item = Py_BuildValue("(y#y#Hy#)", bufs[i], (Py_ssize_t)msgs[i].msg_len, ip, iplen, port,
                                       (const char *)ss, (Py_ssize_t)msgs[i].msg_hdr.msg_namelen);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

static PyObject *
send_batch(PyObject *self, PyObject *args)
{
    int fd;
    PyObject *items;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];

    if (!PyArg_ParseTuple(args, "iO!", &fd, &PyList_Type, &items))
        return NULL;
    Py_ssize_t total = PyList_GET_SIZE(items);
    long failed = 0;
    for (Py_ssize_t base = 0; base < total; base += MAX_BATCH) {
        int n = (int)(total - base < MAX_BATCH ? total - base : MAX_BATCH);
        memset(msgs, 0, sizeof(msgs[0]) * (size_t)n);
        for (int i = 0; i < n; i++) {
            PyObject *item = PyList_GET_ITEM(items, base + i);
            PyObject *data, *name;
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2
                || !PyBytes_Check(data = PyTuple_GET_ITEM(item, 0))
                || !PyBytes_Check(name = PyTuple_GET_ITEM(item, 1))
                || PyBytes_GET_SIZE(name) > (Py_ssize_t)sizeof(struct sockaddr_storage)) {
                PyErr_SetString(PyExc_TypeError, "send_batch wants a list of (bytes, sockaddr bytes)");
                return NULL;
            }
            iov[i].iov_base = PyBytes_AS_STRING(data);
            iov[i].iov_len = (size_t)PyBytes_GET_SIZE(data);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = PyBytes_AS_STRING(name);
            msgs[i].msg_hdr.msg_namelen = (socklen_t)PyBytes_GET_SIZE(name);
        }
        int off = 0;
        while (off < n) {
            int r = sendmmsg(fd, msgs + off, (unsigned int)(n - off), MSG_DONTWAIT);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                failed++; /* this one failed (full buffer, unreachable, ...): skip it */
                off++;
            } else if (r == 0) {
                failed += n - off;
                break;
            } else {
                off += r;
            }
        }
    }
    return PyLong_FromLong(failed);
}

static PyMethodDef methods[] = {
    {"recv_batch", recv_batch, METH_VARARGS, "recv_batch(fd, n) -> [(data, ip, port, sockaddr)]"},
    {"send_batch", send_batch, METH_VARARGS, "send_batch(fd, [(data, sockaddr)]) -> failed count"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "stund._mmsg", NULL, -1, methods};

PyMODINIT_FUNC
PyInit__mmsg(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

#else /* not Linux: no module, stund uses recvfrom/sendto */
#error "stund._mmsg needs Linux recvmmsg/sendmmsg"
#endif
