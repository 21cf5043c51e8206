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
 *
 * The STUN fast path (see stund/server.py, "the answering thread"):
 *
 *   answer(data, ip, port, tailscale_only) -> (reply, kind) or None
 *       The reply stund.binding.answer gives a plain Binding request received on a socket
 *       outside an RFC 5780 grid, byte for byte, and its kind (0 tailscale, 1 rfc5389,
 *       2 rfc3489); None for everything this code leaves to Python (any other message,
 *       malformed input, CHANGE-REQUEST, RESPONSE-PORT, unknown attributes, --tailscale-only
 *       refusals).  The same function the thread uses; exposed for tests and benchmarks.
 *   FastStun(fd, counts, request_slots, ok_slot, read_error_slot, write_error_slot,
 *            tailscale_only, callback, pending)
 *       run():  blocks until stop(), without the GIL: poll() on the socket and a wake-up
 *               eventfd, one recvmmsg (up to MAX_BATCH), the replies built here, one
 *               sendmmsg.  Datagrams answer() returns None for are handed, in one list per
 *               batch of (data, ip, port, name) as recv_batch returns them, to callback,
 *               called with the GIL before the batch's replies are sent; after it returns,
 *               the counts it left in the list `pending` are added to `counts` and zeroed.
 *       stop(): makes run() return (from any thread; idempotent).
 *       counts: a writable buffer of 64-bit counters (array('Q') or a multiprocessing
 *               RawArray('Q')) that only these threads write, with atomic adds.
 *       request_slots: six slot numbers, (ipv4, ipv6) x (tailscale, rfc5389, rfc3489).
 *       Every loop is bounded: at most MAX_BATCH datagrams per batch, the stop flag checked
 *       before each; after a batch the thread reads on for at most SPIN_NS (see there)
 *       before it sleeps in poll() again, and the GIL is taken only to call the callback.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifdef __linux__
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 64
#define MAX_DATAGRAM 2048

/* Module state: recv_batch's receive buffers (MAX_BATCH x MAX_DATAGRAM).  recv_batch runs
 * from start to end with the GIL held (it never releases it) and the module declares that it
 * needs the GIL (Py_mod_gil), so two calls never use them at once; FastStun's thread has a
 * batch of its own (struct batch). */
typedef struct {
    PyObject *faststun_type;
    char (*bufs)[MAX_DATAGRAM];
} mmsg_state;

/* The sender's packed IP (4 bytes for IPv4 and v4-mapped IPv6, else 16; 0 for other
 * families, and for an address shorter than its family's: namelen is what the kernel filled
 * in) and port. */
static int
peer_of(const struct sockaddr_storage *ss, socklen_t namelen, const unsigned char **ip, unsigned short *port)
{
    if (namelen >= (socklen_t)sizeof(struct sockaddr_in) && ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        *ip = (const unsigned char *)&a->sin_addr;
        *port = ntohs(a->sin_port);
        return 4;
    }
    if (namelen >= (socklen_t)sizeof(struct sockaddr_in6) && ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        *ip = (const unsigned char *)&a->sin6_addr;
        *port = ntohs(a->sin6_port);
        if (IN6_IS_ADDR_V4MAPPED(&a->sin6_addr)) {
            *ip += 12;
            return 4;
        }
        return 16;
    }
    *ip = (const unsigned char *)"";
    *port = 0;
    return 0;
}

/* One recv_batch item: (data, ip, port, name). */
static PyObject *
make_item(const char *data, unsigned int len, const struct sockaddr_storage *ss, socklen_t namelen)
{
    const unsigned char *ip;
    unsigned short port;
    if (namelen > (socklen_t)sizeof(*ss)) /* a truncated address: never for UDP */
        namelen = (socklen_t)sizeof(*ss);
    int iplen = peer_of(ss, namelen, &ip, &port);
    return Py_BuildValue("(y#y#Hy#)", data, (Py_ssize_t)len, (const char *)ip, (Py_ssize_t)iplen, port,
                         (const char *)ss, (Py_ssize_t)namelen);
}

static PyObject *
recv_batch(PyObject *self, PyObject *args)
{
    int fd, n;
    struct mmsghdr msgs[MAX_BATCH];
    struct iovec iov[MAX_BATCH];
    struct sockaddr_storage names[MAX_BATCH];

    if (!PyArg_ParseTuple(args, "ii", &fd, &n))
        return NULL;
    char (*bufs)[MAX_DATAGRAM] = ((mmsg_state *)PyModule_GetState(self))->bufs;
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
        PyObject *item = make_item(bufs[i], msgs[i].msg_len, &names[i], msgs[i].msg_hdr.msg_namelen);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* sendmmsg until every message is sent or skipped; returns how many failed. */
static long
send_all(int fd, struct mmsghdr *msgs, int n)
{
    long failed = 0;
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
    return failed;
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
        failed += send_all(fd, msgs, n);
    }
    return PyLong_FromLong(failed);
}

/* --- the STUN fast path ------------------------------------------------------------------ */

#define FP_XOR 0x5354554Eu /* FINGERPRINT = CRC-32 ^ "STUN" */
#define MAX_REPLY 52       /* header + XOR-MAPPED-ADDRESS (IPv6) + FINGERPRINT */
enum { KIND_TAILSCALE, KIND_RFC5389, KIND_RFC3489 };

static const unsigned char COOKIE[4] = {0x21, 0x12, 0xa4, 0x42};
static uint32_t crc_table[256]; /* written once (pthread_once), then only read */
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void
crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

/* CRC-32 as zlib.crc32 computes it. */
static uint32_t
crc32_ieee(const unsigned char *p, size_t n)
{
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static unsigned
be16(const unsigned char *p)
{
    return ((unsigned)p[0] << 8) | p[1];
}

static void
put16(unsigned char *p, unsigned v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
}

static void
put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Comprehension-required attributes stund.binding answers a plain Binding request with
 * unchanged: the ones it understands (authentication is understood and ignored), minus
 * CHANGE-REQUEST (0x0003) and RESPONSE-PORT (0x0027), whose answers Python decides. */
static int
plain_required(unsigned t)
{
    switch (t) {
    case 0x0001: /* MAPPED-ADDRESS */
    case 0x0006: /* USERNAME */
    case 0x0008: /* MESSAGE-INTEGRITY */
    case 0x0009: /* ERROR-CODE */
    case 0x000A: /* UNKNOWN-ATTRIBUTES */
    case 0x0014: /* REALM */
    case 0x0015: /* NONCE */
    case 0x001C: /* MESSAGE-INTEGRITY-SHA256 */
    case 0x001E: /* USERHASH */
    case 0x0020: /* XOR-MAPPED-ADDRESS */
    case 0x0026: /* PADDING (only answered with padding in an RFC 5780 grid) */
        return 1;
    default:
        return 0;
    }
}

/* The reply stund.binding.answer(d, ip, port, tailscale_only=...) gives outside an RFC 5780
 * grid, written to out (MAX_REPLY bytes); returns its length, or 0 when Python must decide
 * (then nothing is known about the datagram).  *kind receives the request kind. */
static int
fast_answer(const unsigned char *d, size_t n, const unsigned char *ip, int iplen, unsigned port,
            int tailscale_only, unsigned char *out, int *kind)
{
    if (n < 20 || (iplen != 4 && iplen != 16))
        return 0;
    if (d[0] != 0x00 || d[1] != 0x01) /* a Binding request: method 1, class 0 */
        return 0;
    size_t len = be16(d + 2);
    if ((len & 3) || 20 + len != n)
        return 0;
    int classic = memcmp(d + 4, COOKIE, 4) != 0;
    int has_fp = 0, tailnode = 0;
    size_t pos = 20;
    while (pos < n) {
        if (n - pos < 4)
            return 0;
        unsigned t = be16(d + pos), l = be16(d + pos + 2);
        size_t start = pos + 4, padded = ((size_t)l + 3) & ~(size_t)3;
        if (start + padded > n)
            return 0;
        if (t == 0x8028 && !classic) { /* FINGERPRINT: last, 4 bytes, correct */
            if (l != 4 || start + 4 != n)
                return 0;
            uint32_t want = crc32_ieee(d, pos) ^ FP_XOR;
            uint32_t got = ((uint32_t)d[start] << 24) | ((uint32_t)d[start + 1] << 16)
                           | ((uint32_t)d[start + 2] << 8) | d[start + 3];
            if (got != want)
                return 0;
            has_fp = 1;
        } else if (t < 0x8000 && !plain_required(t)) {
            return 0;
        } else if (t == 0x8022 && l == 8 && memcmp(d + start, "tailnode", 8) == 0) {
            tailnode = 1;
        }
        pos = start + padded;
    }
    if (classic)
        *kind = KIND_RFC3489;
    else if (has_fp && tailnode) /* FINGERPRINT is last when present */
        *kind = KIND_TAILSCALE;
    else
        *kind = KIND_RFC5389;
    if (tailscale_only && *kind != KIND_TAILSCALE)
        return 0;

    size_t alen = iplen == 4 ? 8 : 20;
    size_t body = 4 + alen;
    size_t total = 20 + body + (has_fp ? 8 : 0);
    if (total > n + 24 || total > MAX_REPLY) /* binding.MAX_GROWTH; never true for these */
        return 0;
    put16(out, 0x0101); /* Binding success response */
    put16(out + 2, (unsigned)(total - 20));
    memcpy(out + 4, d + 4, 16); /* cookie + 12-byte id, or the 16-byte RFC 3489 id */
    unsigned char *a = out + 20;
    put16(a + 2, (unsigned)alen);
    a[4] = 0;
    a[5] = iplen == 4 ? 1 : 2;
    if (classic) {
        put16(a, 0x0001); /* MAPPED-ADDRESS */
        put16(a + 6, port);
        memcpy(a + 8, ip, (size_t)iplen);
    } else {
        put16(a, 0x0020); /* XOR-MAPPED-ADDRESS: port ^ 0x2112, ip ^ (cookie || id) */
        put16(a + 6, port ^ 0x2112);
        for (int i = 0; i < iplen; i++)
            a[8 + i] = ip[i] ^ d[4 + i];
    }
    if (has_fp) {
        unsigned char *f = out + 20 + body;
        put16(f, 0x8028);
        put16(f + 2, 4);
        put32(f + 4, crc32_ieee(out, 20 + body) ^ FP_XOR);
    }
    return (int)total;
}

static PyObject *
py_answer(PyObject *self, PyObject *args)
{
    Py_buffer data, ip;
    unsigned int port;
    int tailscale_only;
    if (!PyArg_ParseTuple(args, "y*y*Ip", &data, &ip, &port, &tailscale_only))
        return NULL;
    unsigned char out[MAX_REPLY];
    int kind = 0;
    int n = 0;
    if (port <= 0xFFFF)
        n = fast_answer(data.buf, (size_t)data.len, ip.buf, (int)ip.len, port, tailscale_only, out, &kind);
    PyBuffer_Release(&data);
    PyBuffer_Release(&ip);
    if (n == 0)
        Py_RETURN_NONE;
    return Py_BuildValue("(y#i)", (const char *)out, (Py_ssize_t)n, kind);
}

struct batch {
    char in[MAX_BATCH][MAX_DATAGRAM];
    unsigned char out[MAX_BATCH][MAX_REPLY];
    struct sockaddr_storage names[MAX_BATCH];
    struct mmsghdr rmsg[MAX_BATCH], smsg[MAX_BATCH];
    struct iovec riov[MAX_BATCH], siov[MAX_BATCH];
    int pass[MAX_BATCH];
};

typedef struct {
    PyObject_HEAD
    int fd, wake_fd, tailscale_only, running, stopping;
    int req_slot[2][3], ok_slot, read_slot, write_slot;
    Py_buffer counts;
    int have_counts;
    uint64_t *c;
    PyObject *callback, *pending;
} FastStun;

static void
bump(FastStun *s, int slot, long n)
{
    __atomic_fetch_add(&s->c[slot], (uint64_t)n, __ATOMIC_RELAXED);
}

static int
FastStun_init(FastStun *s, PyObject *args, PyObject *kwds)
{
    PyObject *slots, *callback, *pending, *counts;
    int fd, ok, rd, wr, ts;
    if (!PyArg_ParseTuple(args, "iOOiiipOO!", &fd, &counts, &slots, &ok, &rd, &wr, &ts, &callback,
                          &PyList_Type, &pending))
        return -1;
    if (s->have_counts || s->wake_fd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "FastStun is already initialised");
        return -1;
    }
    if (!PyCallable_Check(callback)) {
        PyErr_SetString(PyExc_TypeError, "callback must be callable");
        return -1;
    }
    if (PyObject_GetBuffer(counts, &s->counts, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    s->have_counts = 1;
    Py_ssize_t nslots = s->counts.len / 8;
    if (s->counts.itemsize != 8 || ((uintptr_t)s->counts.buf & 7)) {
        PyErr_SetString(PyExc_TypeError, "counts must be an aligned buffer of 64-bit counters");
        return -1;
    }
    s->c = (uint64_t *)s->counts.buf;
    PyObject *seq = PySequence_Fast(slots, "request_slots must be a sequence of six ints");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != 6) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "request_slots must hold six slot numbers");
        return -1;
    }
    int all[9];
    for (int i = 0; i < 6; i++) {
        all[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        s->req_slot[i / 3][i % 3] = all[i];
    }
    Py_DECREF(seq);
    if (PyErr_Occurred())
        return -1;
    all[6] = ok, all[7] = rd, all[8] = wr;
    for (int i = 0; i < 9; i++) {
        if (all[i] < 0 || all[i] >= nslots) {
            PyErr_SetString(PyExc_ValueError, "a counter slot is outside the counts buffer");
            return -1;
        }
    }
    s->ok_slot = ok, s->read_slot = rd, s->write_slot = wr;
    s->fd = fd;
    s->tailscale_only = ts;
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (s->wake_fd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    Py_INCREF(callback);
    Py_XSETREF(s->callback, callback);
    Py_INCREF(pending);
    Py_XSETREF(s->pending, pending);
    return 0;
}

static PyObject *
FastStun_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    FastStun *s = (FastStun *)type->tp_alloc(type, 0);
    if (s != NULL) {
        s->fd = -1;
        s->wake_fd = -1;
    }
    return (PyObject *)s;
}

/* The garbage collector's view: callback and pending may be part of a cycle (a bound method
 * of an object that holds this FastStun).  While run() runs it holds a reference of its own,
 * so a running FastStun is never cleared. */
static int
FastStun_traverse(FastStun *s, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(s));
    Py_VISIT(s->callback);
    Py_VISIT(s->pending);
    return 0;
}

static int
FastStun_clear(FastStun *s)
{
    Py_CLEAR(s->callback);
    Py_CLEAR(s->pending);
    return 0;
}

static void
FastStun_dealloc(FastStun *s)
{
    PyTypeObject *tp = Py_TYPE(s);
    PyObject_GC_UnTrack(s);
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    if (s->have_counts)
        PyBuffer_Release(&s->counts);
    FastStun_clear(s);
    tp->tp_free((PyObject *)s);
    Py_DECREF(tp);
}

static PyObject *
FastStun_stop(FastStun *s, PyObject *unused)
{
    __atomic_store_n(&s->stopping, 1, __ATOMIC_SEQ_CST);
    if (s->wake_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(s->wake_fd, &one, sizeof(one));
        (void)r; /* EAGAIN: the counter is already non-zero, it is readable anyway */
    }
    Py_RETURN_NONE;
}

/* With the GIL: hands the datagrams at b->pass[0..npass) to the callback, then folds the
 * counts it left in `pending` into the counters.  -1 with an exception set on failure. */
static int
hand_over(FastStun *s, struct batch *b, int npass)
{
    PyObject *items = PyList_New(npass);
    if (items == NULL)
        return -1;
    for (int k = 0; k < npass; k++) {
        int i = b->pass[k];
        PyObject *item = make_item(b->in[i], b->rmsg[i].msg_len, &b->names[i], b->rmsg[i].msg_hdr.msg_namelen);
        if (item == NULL) {
            Py_DECREF(items);
            return -1;
        }
        PyList_SET_ITEM(items, k, item);
    }
    PyObject *r = PyObject_CallOneArg(s->callback, items);
    Py_DECREF(items);
    int rc = 0;
    if (r == NULL)
        rc = -1;
    Py_XDECREF(r);
    Py_ssize_t n = PyList_GET_SIZE(s->pending);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyList_GET_ITEM(s->pending, i);
        if (!PyLong_Check(v))
            continue;
        long long add = PyLong_AsLongLong(v);
        if (add == -1 && PyErr_Occurred()) {
            if (rc == 0)
                return -1;
            PyErr_Clear(); /* keep the callback's exception */
            continue;
        }
        if (add != 0 && i < (Py_ssize_t)(s->counts.len / 8)) {
            bump(s, (int)i, (long)add);
            PyObject *zero = PyLong_FromLong(0);
            if (zero == NULL)
                return -1;
            PyList_SetItem(s->pending, i, zero);
        }
    }
    return rc;
}

/* After a batch, the thread keeps reading (non-blocking) for up to SPIN_NS before it goes
 * back to poll(): under load the next request is usually there by then, and is taken without
 * the sleep and wake-up (on a virtual machine, waking an idle CPU is tens of microseconds).
 * A spin that finds nothing halves the next one; below SPIN_MIN_NS spinning stops for
 * SPIN_REST batches.  So sparse traffic costs about one short spin per SPIN_REST requests. */
#ifndef SPIN_NS
#define SPIN_NS 100000L
#endif
#define SPIN_MIN_NS 2000L
#define SPIN_REST 16

/* The answering thread asks the scheduler for a short time slice (Linux >= 6.12, EEVDF:
 * sched_attr.sched_runtime of a SCHED_OTHER thread; no privilege needed, ignored or refused
 * by older kernels).  A thread that works in short bursts then gets the CPU soon after it
 * wakes even when another process keeps that CPU busy, instead of waiting for the other's
 * slice to end (measured: p99 2.4 ms -> 0.7 ms with a busy loop on the server's CPU). */
#ifndef SLICE_NS
#define SLICE_NS 100000ULL
#endif

struct sched_attr_v1 { /* struct sched_attr, SCHED_ATTR_SIZE_VER1 */
    uint32_t size, sched_policy;
    uint64_t sched_flags;
    int32_t sched_nice;
    uint32_t sched_priority;
    uint64_t sched_runtime, sched_deadline, sched_period;
    uint32_t sched_util_min, sched_util_max;
};

static void
ask_for_short_slice(void)
{
#if defined(SYS_sched_getattr) && defined(SYS_sched_setattr)
    struct sched_attr_v1 attr;
    memset(&attr, 0, sizeof(attr));
    if (SLICE_NS == 0 || syscall(SYS_sched_getattr, 0, &attr, sizeof(attr), 0) != 0)
        return;
    if (attr.sched_policy != 0 /* SCHED_OTHER */ || attr.sched_runtime <= SLICE_NS)
        return; /* another policy, or already short (0: a kernel without slices) */
    attr.size = sizeof(attr);
    attr.sched_flags = 0;
    attr.sched_runtime = SLICE_NS; /* policy and nice value as they were */
    (void)syscall(SYS_sched_setattr, 0, &attr, 0);
#endif
}

static int
past(const struct timespec *deadline)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > deadline->tv_sec || (now.tv_sec == deadline->tv_sec && now.tv_nsec >= deadline->tv_nsec);
}

static PyObject *
FastStun_run(FastStun *s, PyObject *unused)
{
    if (s->wake_fd < 0 || s->callback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "FastStun is not initialised");
        return NULL;
    }
    if (s->running) {
        PyErr_SetString(PyExc_RuntimeError, "FastStun.run is already running");
        return NULL;
    }
    struct batch *b = malloc(sizeof(*b));
    if (b == NULL)
        return PyErr_NoMemory();
    s->running = 1;
    Py_INCREF(s);
    int fail_errno = 0, py_failed = 0;
    long spin_ns = SPIN_NS; /* the next spin's length */
    int rest = 0;            /* batches left without spinning after the spin shrank to nothing */
    int spinning = 0;
    struct timespec deadline = {0, 0};
    PyThreadState *save = PyEval_SaveThread();
    ask_for_short_slice();
    while (!__atomic_load_n(&s->stopping, __ATOMIC_SEQ_CST)) {
        if (!spinning) {
            struct pollfd pfd[2] = {{s->fd, POLLIN, 0}, {s->wake_fd, POLLIN, 0}};
            int pr = poll(pfd, 2, -1);
            if (pr < 0) {
                if (errno == EINTR)
                    continue;
                fail_errno = errno;
                break;
            }
            if (pfd[1].revents)
                break;
            if (pfd[0].revents & POLLNVAL) {
                fail_errno = EBADF;
                break;
            }
            if (!pfd[0].revents)
                continue;
        }
        memset(b->rmsg, 0, sizeof(b->rmsg));
        for (int i = 0; i < MAX_BATCH; i++) {
            b->riov[i].iov_base = b->in[i];
            b->riov[i].iov_len = MAX_DATAGRAM;
            b->rmsg[i].msg_hdr.msg_iov = &b->riov[i];
            b->rmsg[i].msg_hdr.msg_iovlen = 1;
            b->rmsg[i].msg_hdr.msg_name = &b->names[i];
            b->rmsg[i].msg_hdr.msg_namelen = sizeof(b->names[i]);
        }
        int got = recvmmsg(s->fd, b->rmsg, MAX_BATCH, MSG_DONTWAIT, NULL);
        if (got < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                /* A pending socket error is reported (and cleared) once.  Anything that
                 * would fail again at once (ENOMEM, ...) is retried at most every 1 ms,
                 * still watching the wake-up fd. */
                bump(s, s->read_slot, 1);
                struct pollfd wake = {s->wake_fd, POLLIN, 0};
                (void)poll(&wake, 1, 1);
            }
            if (spinning && past(&deadline)) {
                /* Nothing came: spin half as long next time, down to not at all. */
                spinning = 0;
                spin_ns /= 2;
                if (spin_ns < SPIN_MIN_NS) {
                    spin_ns = 0;
                    rest = SPIN_REST;
                }
            }
            continue;
        }
        if (spinning)
            spin_ns = SPIN_NS; /* found work while spinning: the traffic is dense */
        else if (spin_ns == 0 && --rest <= 0)
            spin_ns = SPIN_NS; /* try again */
        spinning = 0;
        int nreply = 0, npass = 0;
        for (int i = 0; i < got; i++) {
            const unsigned char *ip;
            unsigned short port;
            int iplen = peer_of(&b->names[i], b->rmsg[i].msg_hdr.msg_namelen, &ip, &port);
            int kind = 0, len = 0;
            if (!(b->rmsg[i].msg_hdr.msg_flags & MSG_TRUNC))
                len = fast_answer((const unsigned char *)b->in[i], b->rmsg[i].msg_len, ip, iplen, port,
                                  s->tailscale_only, b->out[nreply], &kind);
            if (len == 0) {
                b->pass[npass++] = i;
                continue;
            }
            bump(s, s->req_slot[iplen == 16][kind], 1);
            struct mmsghdr *m = &b->smsg[nreply];
            memset(m, 0, sizeof(*m));
            b->siov[nreply].iov_base = b->out[nreply];
            b->siov[nreply].iov_len = (size_t)len;
            m->msg_hdr.msg_iov = &b->siov[nreply];
            m->msg_hdr.msg_iovlen = 1;
            m->msg_hdr.msg_name = &b->names[i];
            m->msg_hdr.msg_namelen = b->rmsg[i].msg_hdr.msg_namelen;
            nreply++;
        }
        if (npass) {
            PyEval_RestoreThread(save);
            int rc = hand_over(s, b, npass);
            save = PyEval_SaveThread();
            if (rc < 0) {
                py_failed = 1;
                break;
            }
        }
        if (nreply) {
            /* Counted before sending, so a client that sees its reply sees the count. */
            bump(s, s->ok_slot, nreply);
            long failed = send_all(s->fd, b->smsg, nreply);
            if (failed) {
                __atomic_fetch_sub(&s->c[s->ok_slot], (uint64_t)failed, __ATOMIC_RELAXED);
                bump(s, s->write_slot, failed);
            }
        }
        if (spin_ns) {
            clock_gettime(CLOCK_MONOTONIC, &deadline);
            deadline.tv_nsec += spin_ns;
            if (deadline.tv_nsec >= 1000000000L) {
                deadline.tv_sec++;
                deadline.tv_nsec -= 1000000000L;
            }
            spinning = 1;
        }
    }
    PyEval_RestoreThread(save);
    free(b);
    s->running = 0;
    Py_DECREF(s);
    if (py_failed)
        return NULL;
    if (fail_errno) {
        errno = fail_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyMethodDef FastStun_methods[] = {
    {"run", (PyCFunction)FastStun_run, METH_NOARGS, "run() -> None: answers until stop(), without the GIL"},
    {"stop", (PyCFunction)FastStun_stop, METH_NOARGS, "stop() -> None: makes run() return (any thread)"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot FastStun_slots[] = {
    {Py_tp_doc, "The STUN answering loop of one UDP socket (see the module docstring)."},
    {Py_tp_new, FastStun_new},
    {Py_tp_init, FastStun_init},
    {Py_tp_dealloc, FastStun_dealloc},
    {Py_tp_traverse, FastStun_traverse},
    {Py_tp_clear, FastStun_clear},
    {Py_tp_methods, FastStun_methods},
    {0, NULL},
};

static PyType_Spec FastStun_spec = {
    .name = "stund._mmsg.FastStun",
    .basicsize = sizeof(FastStun),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = FastStun_slots,
};

static PyMethodDef methods[] = {
    {"recv_batch", recv_batch, METH_VARARGS, "recv_batch(fd, n) -> [(data, ip, port, sockaddr)]"},
    {"send_batch", send_batch, METH_VARARGS, "send_batch(fd, [(data, sockaddr)]) -> failed count"},
    {"answer", py_answer, METH_VARARGS, "answer(data, ip, port, tailscale_only) -> (reply, kind) or None"},
    {NULL, NULL, 0, NULL},
};

/* Multi-phase initialisation: every import (each interpreter) gets its own module object, type
 * and buffers; nothing mutable is shared but the CRC table, written once. */
static int
mmsg_exec(PyObject *m)
{
    mmsg_state *st = PyModule_GetState(m);
    pthread_once(&crc_once, crc_init);
    st->bufs = PyMem_Malloc(sizeof(char[MAX_BATCH][MAX_DATAGRAM]));
    if (st->bufs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    st->faststun_type = PyType_FromModuleAndSpec(m, &FastStun_spec, NULL);
    if (st->faststun_type == NULL)
        return -1;
    if (PyModule_AddType(m, (PyTypeObject *)st->faststun_type) < 0)
        return -1;
    return PyModule_AddIntConstant(m, "MAX_BATCH", MAX_BATCH);
}

static int
mmsg_traverse(PyObject *m, visitproc visit, void *arg)
{
    mmsg_state *st = PyModule_GetState(m);
    Py_VISIT(st->faststun_type);
    return 0;
}

static int
mmsg_clear(PyObject *m)
{
    mmsg_state *st = PyModule_GetState(m);
    Py_CLEAR(st->faststun_type);
    return 0;
}

static void
mmsg_free(void *m)
{
    mmsg_state *st = PyModule_GetState((PyObject *)m);
    mmsg_clear((PyObject *)m);
    PyMem_Free(st->bufs);
    st->bufs = NULL;
}

static PyModuleDef_Slot mmsg_slots[] = {
    {Py_mod_exec, mmsg_exec},
#ifdef Py_mod_gil
    /* recv_batch's buffers and the callback's bookkeeping rely on the GIL (see mmsg_state) */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "stund._mmsg",
    .m_size = sizeof(mmsg_state),
    .m_methods = methods,
    .m_slots = mmsg_slots,
    .m_traverse = mmsg_traverse,
    .m_clear = mmsg_clear,
    .m_free = mmsg_free,
};

PyMODINIT_FUNC
PyInit__mmsg(void)
{
    return PyModuleDef_Init(&module);
}

#else /* not Linux: no module, stund uses recvfrom/sendto */
#error "stund._mmsg needs Linux recvmmsg/sendmmsg"
#endif
