/* derpd._dataplane: the relay's packet path for plain-TCP and TLS clients, in C (optional, Linux).
 *
 * One Engine per relay process owns an epoll set of logged-in plain-TCP and TLS client sockets.  The
 * relay's Trio side (derpd/relay/dataplane.py) waits until the epoll descriptor is readable and
 * calls poll(); poll() then, with no Python per packet:
 *
 *   - reads each ready socket once (at most recv_size bytes, after the slot's leftover partial
 *     frame), splits every complete SendPacket, looks the destination up in the registry's
 *     ``active`` dict, keeps the PeerGone bookkeeping (the destination's ``saw_src`` set, given
 *     to add(), and ``watch(dst, src)``), builds the RecvPacket frame and queues it on the
 *     destination: on its Engine slot, or through ``enqueue(dst, src, frame, disco)`` for a
 *     connection the engine does not own (WebSocket, mesh, a TLS stream not taken over);
 *   - writes each destination's queue (the partial frame first, then control frames, then
 *     packets, then disco packets; the same order as ClientConnection's Python writer) with one
 *     writev after each sender's read, and waits for EPOLLOUT when the kernel did not take
 *     everything.
 *
 * Anything else -- another frame type, a SendPacket that is too long or too short, one for a
 * key with no local connection, EOF, or everything while a receive rate limit is configured
 * ("passthrough") -- is handed back to Python with the raw bytes from that frame on: the slot
 * stops reading until Python calls resume() with what its FrameDecoder did not consume.  So
 * the Python code keeps every rule (control-frame budget, rate limit, mesh, NotHere, errors);
 * the engine only moves the common packets.
 *
 * Queues: two rings of ``depth`` packets (other, disco) dropping the oldest when full, and a
 * control list that is never dropped from; a frame the kernel took in part is kept whole-first
 * (``partial``), so frames on the wire stay whole.  Counters (packets and bytes received and
 * sent, drops by reason and kind) go to ``count`` and ``drop`` at the end of every call.
 *
 * The contract with Python (module attribute CONTRACT, checked by tests/derpd/test_contract.py):
 * a connection is an opaque token to the engine -- it is handed to the callbacks and returned in
 * events, hashed by identity, and no attribute of it is ever read or called.  What the engine
 * needs is passed in: the callbacks at construction, the key and the ``saw_src`` set at add().
 * The only objects whose methods it calls by name are the standard library's ssl.SSLObject and
 * ssl.MemoryBIO of a TLS slot, bound once at add() (and a BIO's ``pending`` at resume()).
 *
 *   Engine(active, *, watch, note_activity, enqueue, count, drop, clock, disco_magic, disco_min_len,
 *          send_limit, depth, recv_size)
 *     watch(conn, src)                      a destination hears PeerGone when src leaves
 *     note_activity(conn)                   a duplicate connection sent: it becomes the active one
 *     enqueue(conn, src, frame, disco)->full  a destination the engine does not own
 *     count(pk_in, bytes_in, disco_in, pk_out, bytes_out)   drop(reason, disco, nbytes, n)
 *     clock() -> seconds                    the relay's clock (trio.current_time): read once at the
 *                                           start of poll(), enqueue(), send_control() and expire(),
 *                                           for write deadlines and queue delays
 *   fileno() -> int           add(fd, conn, key, saw_src[, tls]) -> slot        resume(slot, leftover)
 *   remove(slot)              enqueue(slot, frame, disco) -> full
 *   send_control(slot, frame) pending(slot) -> bool       poll(passthrough) -> [(conn, kind, data)]
 *   expire(timeout) -> [(conn, 2, "write_timeout")] (writes waiting since clock() - timeout or longer)
 *   backlogged() -> poll() again without waiting
 *   slot_stats(slot) -> (queued, queued_disco, control, packets_in, bytes_in, packets_out, bytes_out, drops_full)
 *   queue_delay() -> (bounds, counts, sum): one packet in 64 is stamped when queued and observed
 *                    when written (on the clock as read by that call); counts has one more bucket (+Inf)
 *
 * The epoll set also holds an eventfd: resume() writes to it when the slot it resumes has TLS
 * records already read (so no socket event will come for them), which makes the epoll
 * descriptor readable and the Trio side call poll() for them.
 *
 * Events: kind 0 = bytes handed back, kind 1 = EOF (data: the bytes still buffered), kind 2 =
 * the engine closed the socket's path (data: "read_error", "write_error", "write_timeout",
 * "tls_output_limit"), kind 3 = an exception raised while serving that connection (data: the
 * exception; only that connection's path is closed, see contain()).
 * Single-threaded: every call holds the GIL; nothing here runs on another thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#define HEADER_LEN 5
#define KEY_LEN 32
#define RECV_OVERHEAD (HEADER_LEN + KEY_LEN)
#define MAX_EVENTS 256
#define MAX_IOV 256
#define POLL_BYTE_BUDGET (2 * 1024 * 1024)
#define POLL_FRAME_BUDGET 2048 /* frames routed per poll(): a flood of tiny frames yields too */
/* TLS: ciphertext OpenSSL makes on its own (a KeyUpdate answer) while the client does not read
 * what waits already; a client that asks for more than this is closed ("tls_output_limit") */
#define TLS_MORE_MAX (64 * 1024)
#define QD_MASK 63              /* one packet in 64 has its queue delay measured */
#define QD_N 15
static const double qd_bounds[QD_N] = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                       0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0}; /* diagnostics.QD_BUCKETS */

enum { S_FREE = 0, S_LIVE, S_DEAD };
enum { DROP_QUEUE_HEAD = 0, DROP_GONE, DROP_WRITE_ERROR, DROP_REASONS };
static const char *drop_names[DROP_REASONS] = {"queue_head", "gone_disconnected", "write_error"};

typedef struct {
    PyObject **items;
    int head, len;
} Ring;

typedef struct {
    int state;
    int fd;
    uint32_t gen;
    int mask;       /* events registered in epoll; -1: not registered */
    int reading;    /* EPOLLIN wanted: the engine reads this socket */
    int blocked;    /* EPOLLOUT wanted: a write is waiting */
    int dirty;      /* on the engine's flush list */
    int backlog;    /* complete frames wait in ``left``: a destination was full (see process) */
    PyObject *conn; /* strong: an opaque token (see CONTRACT) */
    PyObject *key;  /* strong: the 32-byte key given to add() */
    PyObject *saw;  /* strong: the connection's saw_src set given to add() */
    Ring q, dq;
    PyObject *ctl;  /* list of bytes, or NULL */
    PyObject *partial;
    Py_ssize_t partial_off;
    int partial_pkt;
    int pass_once;  /* hand back everything the next read brings (Python is skipping a frame) */
    int broken;     /* a write failed outside poll(): the next poll() closes the path */
    PyObject *tls, *tls_in, *tls_out; /* TLS: the ssl.SSLObject and its two MemoryBIOs, or NULL */
    PyObject *tls_read, *tls_write, *tls_pending, *in_write, *out_read; /* their methods, bound at add() */
    PyObject *tls_more; /* TLS: a bytearray of ciphertext made while ``partial`` waits, or NULL */
    unsigned char *left;
    Py_ssize_t leftlen;
    double blocked_since;
    int next_free;
    long long rx_pk, rx_by, tx_pk, tx_by, drop_full; /* this client's totals (/debug/clients) */
    PyObject *qd_frame; /* borrowed: the queued packet whose delay is measured, or NULL */
    double qd_t;
} Slot;

/* Module state: the names and exception types the engine uses, one set per module object
 * (multi-phase init); an Engine reaches them through ``st`` (its type holds the module). */
typedef struct {
    PyObject *engine_type;
    PyObject *reason_read, *reason_write, *reason_timeout, *reason_tls_limit;
    PyObject *str_write, *str_read, *str_pending, *exc_want_read, *exc_zero_return;
} dp_state;

typedef struct {
    PyObject_HEAD
    dp_state *st;
    int epfd;
    int wakefd; /* eventfd in the epoll set (WAKE_TOKEN): work that no socket event announces */
    Slot *slots;
    int nslots, cap, free_head;
    int depth, flush_at;
    Py_ssize_t recv_size;
    long long send_limit;
    Py_ssize_t disco_min;
    PyObject *active, *watch, *note_activity, *enqueue_other, *count, *drop, *clock, *magic;
    PyObject *owned; /* dict: conn -> slot index (PyLong), for the slots add() made */
    double now;      /* clock() as read at the start of the current call */
    unsigned char *buf;
    Py_ssize_t bufcap;
    unsigned char *raw; /* one TLS read of ciphertext */
    int *dirty;
    int ndirty;
    int *backlog;
    int nbacklog;
    int in_poll;
    int nbroken; /* slots marked broken since the last poll() */
    int frames_left;
    PyObject *events;
    long long pk_recv, by_recv, disco_recv, pk_sent, by_sent;
    long long drop_n[DROP_REASONS][2], drop_b[DROP_REASONS][2];
    unsigned int qd_tick;
    long long qd_counts[QD_N + 1];
    double qd_sum;
} Engine;


/* Read the relay's clock into e->now.  Called once at the start of every method that may stamp
 * or compare times (poll, enqueue, send_control, expire), before anything changes: a clock that
 * fails makes that call raise with the engine untouched, and nothing inside can fail on time. */
static int
tick(Engine *e)
{
    PyObject *t = PyObject_CallNoArgs(e->clock);
    if (t == NULL)
        return -1;
    double now = PyFloat_AsDouble(t);
    Py_DECREF(t);
    if (now == -1.0 && PyErr_Occurred())
        return -1;
    e->now = now;
    return 0;
}

/* The stamped packet f of s is written: count how long it waited. */
static void
qd_observe(Engine *e, Slot *s)
{
    double d = e->now - s->qd_t;
    if (d < 0)
        d = 0;
    int i = 0;
    while (i < QD_N && d > qd_bounds[i])
        i++;
    e->qd_counts[i]++;
    e->qd_sum += d;
    s->qd_frame = NULL;
}

/* ------------------------------------------------------------------ rings */

static int
ring_alloc(Ring *r, int depth)
{
    if (r->items == NULL) {
        r->items = PyMem_Calloc((size_t)depth, sizeof(PyObject *));
        if (r->items == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static inline PyObject *
ring_at(Ring *r, int depth, int i)
{
    return r->items[(r->head + i) % depth];
}

static inline PyObject *
ring_pop(Ring *r, int depth)
{
    PyObject *o = r->items[r->head];
    r->items[r->head] = NULL;
    r->head = (r->head + 1) % depth;
    r->len--;
    return o;
}

static void
ring_clear(Engine *e, Ring *r, int disco, int reason)
{
    while (r->len > 0) {
        PyObject *o = ring_pop(r, e->depth);
        e->drop_n[reason][disco]++;
        e->drop_b[reason][disco] += PyBytes_GET_SIZE(o) - RECV_OVERHEAD;
        Py_DECREF(o);
    }
    r->head = 0;
}

/* ------------------------------------------------------------------ slots and epoll */

static Slot *
get_slot(Engine *e, PyObject *arg)
{
    long i = PyLong_AsLong(arg);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= e->nslots || e->slots[i].state == S_FREE) {
        PyErr_SetString(PyExc_ValueError, "no such slot");
        return NULL;
    }
    return &e->slots[i];
}

static void
set_mask(Engine *e, Slot *s)
{
    int want = (s->state == S_LIVE) ? ((s->reading && !s->backlog ? EPOLLIN : 0) | (s->blocked ? EPOLLOUT : 0)) : 0;
    if (want == s->mask || (want == 0 && s->mask == -1))
        return;
    int idx = (int)(s - e->slots);
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = (uint32_t)want;
    ev.data.u64 = ((uint64_t)s->gen << 32) | (uint32_t)idx;
    if (want == 0) {
        epoll_ctl(e->epfd, EPOLL_CTL_DEL, s->fd, &ev);
        s->mask = -1;
    } else if (s->mask == -1) {
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, s->fd, &ev) == 0)
            s->mask = want;
    } else if (epoll_ctl(e->epfd, EPOLL_CTL_MOD, s->fd, &ev) == 0) {
        s->mask = want;
    }
}

static int
post(Engine *e, Slot *s, int kind, PyObject *data)
{
    /* steals data */
    if (data == NULL)
        return -1;
    if (e->events == NULL && (e->events = PyList_New(0)) == NULL) {
        Py_DECREF(data);
        return -1;
    }
    PyObject *t = Py_BuildValue("(OiN)", s->conn, kind, data);
    if (t == NULL)
        return -1;
    int r = PyList_Append(e->events, t);
    Py_DECREF(t);
    return r;
}

static int
kill_slot(Engine *e, Slot *s, PyObject *reason)
{
    if (s->state != S_LIVE)
        return 0;
    s->state = S_DEAD;
    s->reading = s->blocked = 0;
    set_mask(e, s);
    Py_INCREF(reason);
    return post(e, s, 2, reason);
}

/* ------------------------------------------------------------------ writing */

static void wake(Engine *e);

/* A write on s failed for good.  Inside poll() the path is closed now; outside (enqueue,
 * send_control from Python) there is no event list to report it on, so the slot is marked
 * broken and poll() is woken to close it (and, should poll() not run, the write timeout
 * fires: blocked_since is set). */
static int
broken_slot(Engine *e, Slot *s)
{
    if (e->in_poll)
        return kill_slot(e, s, e->st->reason_write);
    if (!s->broken) {
        s->broken = 1;
        e->nbroken++;
    }
    if (!s->blocked) {
        s->blocked = 1;
        s->blocked_since = e->now;
        set_mask(e, s);
    }
    wake(e);
    return 0;
}

/* Write what is queued on s with one writev (more if the iovec filled up).  Outside poll() a
 * write error marks the slot broken (see broken_slot), and poll() reports the close. */
static int tls_flush(Engine *e, Slot *s);

static int
flush_slot(Engine *e, Slot *s)
{
    if (s->state != S_LIVE)
        return 0;
    if (s->broken)
        return e->in_poll ? kill_slot(e, s, e->st->reason_write) : 0;
    if (s->tls != NULL)
        return tls_flush(e, s);
    for (;;) {
        struct iovec iov[MAX_IOV];
        int n = 0;
        int depth = e->depth;
        if (s->partial != NULL) {
            iov[n].iov_base = PyBytes_AS_STRING(s->partial) + s->partial_off;
            iov[n].iov_len = (size_t)(PyBytes_GET_SIZE(s->partial) - s->partial_off);
            n++;
        }
        Py_ssize_t nctl = s->ctl ? PyList_GET_SIZE(s->ctl) : 0;
        for (Py_ssize_t i = 0; i < nctl && n < MAX_IOV; i++) {
            PyObject *f = PyList_GET_ITEM(s->ctl, i);
            iov[n].iov_base = PyBytes_AS_STRING(f);
            iov[n].iov_len = (size_t)PyBytes_GET_SIZE(f);
            n++;
        }
        for (int i = 0; i < s->q.len && n < MAX_IOV; i++) {
            PyObject *f = ring_at(&s->q, depth, i);
            iov[n].iov_base = PyBytes_AS_STRING(f);
            iov[n].iov_len = (size_t)PyBytes_GET_SIZE(f);
            n++;
        }
        for (int i = 0; i < s->dq.len && n < MAX_IOV; i++) {
            PyObject *f = ring_at(&s->dq, depth, i);
            iov[n].iov_base = PyBytes_AS_STRING(f);
            iov[n].iov_len = (size_t)PyBytes_GET_SIZE(f);
            n++;
        }
        if (n == 0) {
            if (s->blocked) {
                s->blocked = 0;
                s->blocked_since = 0;
                set_mask(e, s);
            }
            return 0;
        }
        ssize_t w = writev(s->fd, iov, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return broken_slot(e, s);
            w = 0;
        }
        size_t left = (size_t)w;
        /* consume whole frames in the order they were put in the iovec */
        if (s->partial != NULL) {
            size_t len = (size_t)(PyBytes_GET_SIZE(s->partial) - s->partial_off);
            if (left >= len) {
                left -= len;
                if (s->partial_pkt) {
                    e->pk_sent++;
                    e->by_sent += PyBytes_GET_SIZE(s->partial) - RECV_OVERHEAD;
                    s->tx_pk++;
                    s->tx_by += PyBytes_GET_SIZE(s->partial) - RECV_OVERHEAD;
                    if (s->partial == s->qd_frame)
                        qd_observe(e, s);
                }
                Py_CLEAR(s->partial);
                s->partial_off = 0;
            } else {
                s->partial_off += (Py_ssize_t)left;
                left = 0;
                goto blocked;
            }
        }
        while (s->ctl != NULL && PyList_GET_SIZE(s->ctl) > 0) {
            PyObject *f = PyList_GET_ITEM(s->ctl, 0);
            size_t len = (size_t)PyBytes_GET_SIZE(f);
            if (left == 0)
                break;
            Py_INCREF(f);
            if (PySequence_DelItem(s->ctl, 0) < 0) {
                Py_DECREF(f);
                return -1;
            }
            if (left >= len) {
                left -= len;
                Py_DECREF(f);
            } else {
                s->partial = f;
                s->partial_off = (Py_ssize_t)left;
                s->partial_pkt = 0;
                left = 0;
                goto blocked;
            }
        }
        for (int k = 0; k < 2; k++) {
            Ring *r = k ? &s->dq : &s->q;
            while (r->len > 0 && left > 0) {
                PyObject *f = ring_pop(r, depth);
                size_t len = (size_t)PyBytes_GET_SIZE(f);
                if (left >= len) {
                    left -= len;
                    e->pk_sent++;
                    e->by_sent += (long long)len - RECV_OVERHEAD;
                    s->tx_pk++;
                    s->tx_by += (long long)len - RECV_OVERHEAD;
                    if (f == s->qd_frame)
                        qd_observe(e, s);
                    Py_DECREF(f);
                } else {
                    s->partial = f;
                    s->partial_off = (Py_ssize_t)left;
                    s->partial_pkt = 1;
                    left = 0;
                    goto blocked;
                }
            }
        }
        if (w == 0)
            goto blocked;
        if (n == MAX_IOV)
            continue; /* the iovec was full: more may be queued */
        if ((s->ctl == NULL || PyList_GET_SIZE(s->ctl) == 0) && s->q.len == 0 && s->dq.len == 0 && s->partial == NULL) {
            if (s->blocked) {
                s->blocked = 0;
                s->blocked_since = 0;
                set_mask(e, s);
            }
            return 0;
        }
    }
blocked:
    if (!s->blocked) {
        s->blocked = 1;
        s->blocked_since = e->now;
        set_mask(e, s);
    }
    return 0;
}

static int mark_dirty(Engine *e, Slot *s);
static int grow_buf(Engine *e, Py_ssize_t need);

/* ------------------------------------------------------------------ TLS
 *
 * A TLS connection's SSLObject (with its MemoryBIOs) is taken over from trio's SSLStream once
 * the login is done.  Reads: ciphertext from the socket into the incoming BIO, then every
 * complete record decrypted straight into the engine's buffer.  Writes: everything queued is
 * joined and encrypted with one SSLObject.write; the ciphertext (s->partial) is written first
 * and nothing more is encrypted until it is out, so the rings keep their drop-oldest bound. */

/* Steals raw: ciphertext that must go out before anything else is encrypted (e.g. a TLS 1.3
 * KeyUpdate answer).  While ``partial`` is still being written it waits in ``tls_more``, at
 * most TLS_MORE_MAX bytes (amortised appends, no copy of ``partial``).  Returns 0, 1 when the
 * bound is reached (raw dropped: the caller closes the path), -1 with an exception set. */
static int
append_raw(Slot *s, PyObject *raw)
{
    Py_ssize_t n = PyBytes_GET_SIZE(raw);
    if (n == 0) {
        Py_DECREF(raw);
        return 0;
    }
    if (s->partial == NULL) {
        s->partial = raw;
        s->partial_off = 0;
        s->partial_pkt = 0;
        return 0;
    }
    if (s->tls_more == NULL && (s->tls_more = PyByteArray_FromStringAndSize(NULL, 0)) == NULL) {
        Py_DECREF(raw);
        return -1;
    }
    Py_ssize_t have = PyByteArray_GET_SIZE(s->tls_more);
    if (n > TLS_MORE_MAX - have) {
        Py_DECREF(raw);
        return 1;
    }
    if (PyByteArray_Resize(s->tls_more, have + n) < 0) {
        Py_DECREF(raw);
        return -1;
    }
    memcpy(PyByteArray_AS_STRING(s->tls_more) + have, PyBytes_AS_STRING(raw), (size_t)n);
    Py_DECREF(raw);
    return 0;
}

/* ``partial`` is out: what waited behind it goes next.  -1 with an exception set. */
static int
next_partial(Slot *s)
{
    Py_CLEAR(s->partial);
    s->partial_off = 0;
    if (s->tls_more == NULL || PyByteArray_GET_SIZE(s->tls_more) == 0)
        return 0;
    s->partial = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(s->tls_more), PyByteArray_GET_SIZE(s->tls_more));
    Py_CLEAR(s->tls_more);
    return s->partial == NULL ? -1 : 0;
}

/* Collect what the SSLObject wrote into the outgoing BIO (its read() is b"" when there is none). */
static int
take_tls_output(Engine *e, Slot *s)
{
    (void)e;
    PyObject *raw = PyObject_CallNoArgs(s->out_read);
    if (raw == NULL)
        return -1;
    if (!PyBytes_Check(raw)) {
        Py_DECREF(raw);
        PyErr_SetString(PyExc_TypeError, "MemoryBIO.read() must return bytes");
        return -1;
    }
    return append_raw(s, raw);
}

static int
tls_flush(Engine *e, Slot *s)
{
    for (;;) {
        if (s->partial != NULL) {
            Py_ssize_t len = PyBytes_GET_SIZE(s->partial) - s->partial_off;
            ssize_t w = write(s->fd, PyBytes_AS_STRING(s->partial) + s->partial_off, (size_t)len);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN && errno != EWOULDBLOCK)
                    return broken_slot(e, s);
                w = 0;
            }
            if (w < len) {
                s->partial_off += w;
                if (!s->blocked) {
                    s->blocked = 1;
                    s->blocked_since = e->now;
                    set_mask(e, s);
                }
                return 0;
            }
            if (next_partial(s) < 0)
                return -1;
            if (s->partial != NULL)
                continue;
        }
        Py_ssize_t nctl = s->ctl ? PyList_GET_SIZE(s->ctl) : 0;
        if (nctl == 0 && s->q.len == 0 && s->dq.len == 0) {
            if (s->blocked) {
                s->blocked = 0;
                s->blocked_since = 0;
                set_mask(e, s);
            }
            return 0;
        }
        Py_ssize_t total = 0;
        for (Py_ssize_t i = 0; i < nctl; i++)
            total += PyBytes_GET_SIZE(PyList_GET_ITEM(s->ctl, i));
        for (int k = 0; k < 2; k++) {
            Ring *r = k ? &s->dq : &s->q;
            for (int i = 0; i < r->len; i++)
                total += PyBytes_GET_SIZE(ring_at(r, e->depth, i));
        }
        PyObject *plain = PyBytes_FromStringAndSize(NULL, total);
        if (plain == NULL)
            return -1;
        char *out = PyBytes_AS_STRING(plain);
        for (Py_ssize_t i = 0; i < nctl; i++) {
            PyObject *f = PyList_GET_ITEM(s->ctl, i);
            memcpy(out, PyBytes_AS_STRING(f), (size_t)PyBytes_GET_SIZE(f));
            out += PyBytes_GET_SIZE(f);
        }
        if (nctl && PyList_SetSlice(s->ctl, 0, nctl, NULL) < 0) {
            Py_DECREF(plain);
            return -1;
        }
        long long pk[2] = {0, 0}, by[2] = {0, 0};
        for (int k = 0; k < 2; k++) {
            Ring *r = k ? &s->dq : &s->q;
            while (r->len > 0) {
                PyObject *f = ring_pop(r, e->depth);
                Py_ssize_t len = PyBytes_GET_SIZE(f);
                memcpy(out, PyBytes_AS_STRING(f), (size_t)len);
                out += len;
                pk[k]++;
                by[k] += len - RECV_OVERHEAD;
                if (f == s->qd_frame)
                    qd_observe(e, s); /* encrypted now; the ciphertext is written next */
                Py_DECREF(f);
            }
        }
        PyObject *res = PyObject_CallOneArg(s->tls_write, plain);
        Py_DECREF(plain);
        if (res == NULL) {
            /* the packets taken from the rings never left: drops, not sends */
            for (int k = 0; k < 2; k++) {
                e->drop_n[DROP_WRITE_ERROR][k] += pk[k];
                e->drop_b[DROP_WRITE_ERROR][k] += by[k];
            }
            if (!PyErr_ExceptionMatches(PyExc_OSError))
                return -1;
            PyErr_Clear(); /* an ssl.SSLError: the session is broken */
            return broken_slot(e, s);
        }
        Py_DECREF(res);
        e->pk_sent += pk[0] + pk[1];
        e->by_sent += by[0] + by[1];
        s->tx_pk += pk[0] + pk[1];
        s->tx_by += by[0] + by[1];
        if (take_tls_output(e, s) < 0)
            return -1;
    }
}

/* Decrypt every complete record the SSLObject holds into e->buf[have:].  Returns the new end,
 * -1 with an exception set, or -2 for the peer's close_notify (end in *eof_end). */
static Py_ssize_t
tls_decrypt(Engine *e, Slot *s, Py_ssize_t have, Py_ssize_t *eof_end)
{
    Py_ssize_t end = have;
    for (;;) {
        if (e->bufcap - end < 16 * 1024 + 64 && grow_buf(e, end + e->recv_size) < 0)
            return -1;
        PyObject *view = PyMemoryView_FromMemory((char *)e->buf + end, e->bufcap - end, PyBUF_WRITE);
        if (view == NULL)
            return -1;
        PyObject *room = PyLong_FromSsize_t(e->bufcap - end);
        PyObject *got = room == NULL ? NULL : PyObject_CallFunctionObjArgs(s->tls_read, room, view, NULL);
        Py_XDECREF(room);
        /* the memoryview points into e->buf, which grow_buf may move: release it now */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        PyObject *rel = PyObject_CallMethod(view, "release", NULL);
        if (rel == NULL)
            PyErr_Clear();
        Py_XDECREF(rel);
        Py_DECREF(view);
        PyErr_Restore(et, ev, tb);
        if (got == NULL) {
            if (PyErr_ExceptionMatches(e->st->exc_want_read)) {
                PyErr_Clear();
                break;
            }
            if (PyErr_ExceptionMatches(e->st->exc_zero_return)) {
                PyErr_Clear();
                *eof_end = end;
                return -2;
            }
            if (PyErr_ExceptionMatches(PyExc_OSError)) {
                PyErr_Clear();
                *eof_end = -1; /* a broken record: close */
                return -2;
            }
            return -1;
        }
        Py_ssize_t n = PyLong_AsSsize_t(got);
        Py_DECREF(got);
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        end += n;
    }
    int more = take_tls_output(e, s); /* a KeyUpdate answer, for example */
    if (more < 0)
        return -1;
    if (more > 0) { /* the client asks for answers and does not read them */
        if (kill_slot(e, s, e->st->reason_tls_limit) < 0)
            return -1;
        *eof_end = -1;
        return -2;
    }
    if (s->partial != NULL && !s->blocked && mark_dirty(e, s) < 0)
        return -1;
    return end;
}

static int
mark_dirty(Engine *e, Slot *s)
{
    if (s->dirty)
        return 0;
    if (e->ndirty == e->cap) {
        /* the dirty list holds each slot at most once, so cap entries always suffice */
        PyErr_SetString(PyExc_RuntimeError, "dirty list overflow");
        return -1;
    }
    s->dirty = 1;
    e->dirty[e->ndirty++] = (int)(s - e->slots);
    return 0;
}

/* An exception was raised while poll() served s (a callback, an SSLObject method, memory):
 * close s's path alone and hand the exception to Python with it (kind 3), so that one
 * connection's failure does not end every other's.  -1 (exception still set) when it cannot
 * be pinned on a connection or is not an Exception (KeyboardInterrupt, SystemExit). */
static int
contain(Engine *e, Slot *s)
{
    if (s == NULL || s->conn == NULL || !PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    if (ev != NULL && tb != NULL)
        PyException_SetTraceback(ev, tb);
    Py_XDECREF(et);
    Py_XDECREF(tb);
    if (ev == NULL)
        ev = Py_NewRef(Py_None);
    if (s->state == S_LIVE) {
        s->state = S_DEAD;
        s->reading = s->blocked = 0;
        set_mask(e, s);
    }
    return post(e, s, 3, ev);
}

static int
flush_dirty(Engine *e)
{
    int rc = 0;
    for (int i = 0; i < e->ndirty; i++) {
        Slot *s = &e->slots[e->dirty[i]];
        s->dirty = 0;
        if (rc == 0 && !s->blocked && flush_slot(e, s) < 0)
            rc = contain(e, s);
    }
    e->ndirty = 0;
    return rc;
}

/* Queue a RecvPacket frame (a new reference is taken).  Returns 1 when the ring is now full. */
static int
enqueue_slot(Engine *e, Slot *s, PyObject *frame, int disco)
{
    if (s->state != S_LIVE) {
        e->drop_n[DROP_GONE][disco]++;
        e->drop_b[DROP_GONE][disco] += PyBytes_GET_SIZE(frame) - RECV_OVERHEAD;
        return 0;
    }
    Ring *r = disco ? &s->dq : &s->q;
    if (ring_alloc(r, e->depth) < 0)
        return -1;
    if (r->len >= e->depth) {
        PyObject *old = ring_pop(r, e->depth);
        e->drop_n[DROP_QUEUE_HEAD][disco]++;
        e->drop_b[DROP_QUEUE_HEAD][disco] += PyBytes_GET_SIZE(old) - RECV_OVERHEAD;
        s->drop_full++;
        if (old == s->qd_frame)
            s->qd_frame = NULL;
        Py_DECREF(old);
    }
    Py_INCREF(frame);
    r->items[(r->head + r->len) % e->depth] = frame;
    r->len++;
    if ((++e->qd_tick & QD_MASK) == 0 && s->qd_frame == NULL) {
        s->qd_frame = frame;
        s->qd_t = e->now;
    }
    if (!s->blocked) {
        if (!e->in_poll || r->len >= e->flush_at) {
            if (flush_slot(e, s) < 0)
                return -1;
        } else if (mark_dirty(e, s) < 0) {
            return -1;
        }
    }
    return r->len >= e->depth;
}

/* ------------------------------------------------------------------ counters */

/* Hand the counts since the last call to ``count`` and ``drop``, and reset them. */
static int
flush_counters(Engine *e)
{
    int rc = 0;
    if (e->pk_recv || e->by_recv || e->disco_recv || e->pk_sent || e->by_sent) {
        PyObject *res = PyObject_CallFunction(e->count, "LLLLL", e->pk_recv, e->by_recv, e->disco_recv, e->pk_sent,
                                              e->by_sent);
        if (res == NULL)
            rc = -1;
        Py_XDECREF(res);
    }
    e->pk_recv = e->by_recv = e->disco_recv = e->pk_sent = e->by_sent = 0;
    for (int r = 0; r < DROP_REASONS; r++) {
        for (int d = 0; d < 2; d++) {
            if (e->drop_n[r][d] == 0)
                continue;
            if (rc == 0) {
                PyObject *res = PyObject_CallFunction(e->drop, "sOLL", drop_names[r], d ? Py_True : Py_False,
                                                      e->drop_b[r][d], e->drop_n[r][d]);
                if (res == NULL)
                    rc = -1;
                Py_XDECREF(res);
            }
            e->drop_n[r][d] = e->drop_b[r][d] = 0;
        }
    }
    return rc;
}

/* ------------------------------------------------------------------ reading */

static int
hand_back(Engine *e, Slot *s, int kind, const unsigned char *p, Py_ssize_t n)
{
    s->reading = 0;
    s->pass_once = 0;
    set_mask(e, s);
    return post(e, s, kind, PyBytes_FromStringAndSize((const char *)p, n));
}

/* A destination the engine does not own: Python's ``enqueue(conn, src, frame, disco)`` keeps its
 * PeerGone bookkeeping and queues the frame.  -1 on error, else "full". */
static int
enqueue_python(Engine *e, PyObject *conn, PyObject *src, PyObject *frame, int disco)
{
    PyObject *args[4] = {conn, src, frame, disco ? Py_True : Py_False};
    PyObject *r = PyObject_Vectorcall(e->enqueue_other, args, 4, NULL);
    if (r == NULL)
        return -1;
    int full = PyObject_IsTrue(r);
    Py_DECREF(r);
    return full;
}

/* conn's slot, when add() made one for it (the engine's own table: nothing is read from conn).
 * NULL with no exception: not the engine's; NULL with an exception: the lookup failed. */
static Slot *
slot_of(Engine *e, PyObject *conn)
{
    PyObject *v = PyDict_GetItemWithError(e->owned, conn); /* borrowed */
    if (v == NULL)
        return NULL;
    long i = PyLong_AsLong(v);
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0 || i >= e->nslots || e->slots[i].conn != conn || e->slots[i].state == S_FREE)
        return NULL;
    return &e->slots[i];
}

/* Route the frames of buf[0:end] (the slot's leftover, then what was read) for slot idx.
 * Stops at the first frame the engine does not handle (handed back to Python with the rest),
 * after a Python-side queue filled up (the same), or when an engine destination's queue is full
 * while its socket is blocked: then the rest waits in the slot's leftover as a backlog, and the
 * next poll() drains destinations before it goes on -- one round, like the Python reader's
 * checkpoint, so a slow receiver neither stalls its senders nor makes the relay read (and drop)
 * far faster than it can write.  A partial frame at the end is kept for the next read.
 * Returns 0, or -1 with an exception set. */
static int
process(Engine *e, int idx, unsigned char *buf, Py_ssize_t end)
{
    Slot *s = &e->slots[idx];
    Py_ssize_t pos = 0;
    PyObject *src = s->key, *sconn = s->conn;
    Py_INCREF(src);
    Py_INCREF(sconn);
    const char *mag = PyBytes_AS_STRING(e->magic);
    Py_ssize_t maglen = PyBytes_GET_SIZE(e->magic);
    int handled = 0, rc = 0, backlog = 0;
    long long rx_by = 0;
    while (end - pos >= HEADER_LEN) {
        const unsigned char *h = buf + pos;
        unsigned long long n = ((unsigned long long)h[1] << 24) | ((unsigned long long)h[2] << 16)
                               | ((unsigned long long)h[3] << 8) | (unsigned long long)h[4];
        if (h[0] != 4 || (long long)n > e->send_limit || n < KEY_LEN) {
            rc = hand_back(e, &e->slots[idx], 0, h, end - pos);
            pos = end;
            break;
        }
        if ((unsigned long long)(end - pos - HEADER_LEN) < n)
            break; /* a partial SendPacket: kept for the next read */
        if (e->frames_left <= 0) {
            backlog = 1; /* this poll's work is done: the rest goes on next round */
            break;
        }
        const unsigned char *p = h + HEADER_LEN;
        PyObject *dst = PyBytes_FromStringAndSize((const char *)p, KEY_LEN);
        if (dst == NULL) {
            rc = -1;
            break;
        }
        PyObject *conn = PyDict_GetItemWithError(e->active, dst);
        Py_DECREF(dst);
        if (conn == NULL) {
            if (PyErr_Occurred()) {
                rc = -1;
                break;
            }
            rc = hand_back(e, &e->slots[idx], 0, h, end - pos); /* no local destination: Python decides */
            pos = end;
            break;
        }
        Py_INCREF(conn);
        Slot *d = slot_of(e, conn);
        if (d == NULL && PyErr_Occurred()) {
            Py_DECREF(conn);
            rc = -1;
            break;
        }
        Py_ssize_t plen = (Py_ssize_t)n - KEY_LEN;
        int disco = plen >= e->disco_min && plen >= maglen && memcmp(p + KEY_LEN, mag, (size_t)maglen) == 0;
        if (d != NULL && d->blocked && (disco ? d->dq.len : d->q.len) >= e->depth && handled) {
            /* full and waiting for the kernel: let it drain first (see above) */
            Py_DECREF(conn);
            backlog = 1;
            break;
        }
        /* PeerGone bookkeeping for the engine's own destinations (Python's enqueue keeps it
         * for the others) */
        int seen = d == NULL ? 1 : PySet_Contains(d->saw, src);
        if (seen == 0) {
            PyObject *wargs[2] = {conn, src};
            PyObject *w = PyObject_Vectorcall(e->watch, wargs, 2, NULL);
            seen = w == NULL ? -1 : 1;
            Py_XDECREF(w);
            d = seen < 0 ? NULL : slot_of(e, conn); /* the watch callback ran Python */
            if (d == NULL && PyErr_Occurred())
                seen = -1;
        }
        if (seen < 0) {
            Py_DECREF(conn);
            rc = -1;
            break;
        }
        PyObject *frame = PyBytes_FromStringAndSize(NULL, HEADER_LEN + (Py_ssize_t)n);
        if (frame == NULL) {
            Py_DECREF(conn);
            rc = -1;
            break;
        }
        unsigned char *f = (unsigned char *)PyBytes_AS_STRING(frame);
        f[0] = 5;
        memcpy(f + 1, h + 1, 4);
        memcpy(f + HEADER_LEN, PyBytes_AS_STRING(src), KEY_LEN);
        memcpy(f + RECV_OVERHEAD, p + KEY_LEN, (size_t)plen);
        e->pk_recv++;
        e->by_recv += plen;
        e->disco_recv += disco;
        e->frames_left--;
        handled++;
        rx_by += plen;
        pos += HEADER_LEN + (Py_ssize_t)n;
        int full = d != NULL ? enqueue_slot(e, d, frame, disco) : enqueue_python(e, conn, src, frame, disco);
        Py_DECREF(frame);
        Py_DECREF(conn);
        if (full < 0) {
            rc = -1;
            break;
        }
        if (full && d == NULL && pos < end) {
            /* a Python-side queue filled up: let Python yield to its writer, then go on */
            rc = hand_back(e, &e->slots[idx], 0, buf + pos, end - pos);
            pos = end;
            break;
        }
    }
    s = &e->slots[idx];
    if (s->state != S_FREE && s->conn == sconn) {
        s->rx_pk += handled;
        s->rx_by += rx_by;
    }
    if (rc == 0 && pos < end && s->state == S_LIVE) {
        s->left = PyMem_Malloc((size_t)(end - pos));
        if (s->left == NULL) {
            PyErr_NoMemory();
            rc = -1;
        } else {
            memcpy(s->left, buf + pos, (size_t)(end - pos));
            s->leftlen = end - pos;
        }
    }
    if (rc == 0 && backlog && s->state == S_LIVE && s->reading && !s->backlog) {
        s->backlog = 1;
        e->backlog[e->nbacklog++] = idx;
        set_mask(e, s);
    }
    if (rc == 0 && handled) {
        /* a duplicate that is not the active connection for its key sent: it becomes the active
         * one (the registry's rule; read from ``active``, not from the connection) */
        PyObject *cur = PyDict_GetItemWithError(e->active, src); /* borrowed */
        if (cur == NULL && PyErr_Occurred()) {
            rc = -1;
        } else if (cur != NULL && cur != sconn) {
            PyObject *a = PyObject_CallOneArg(e->note_activity, sconn);
            if (a == NULL)
                rc = -1;
            Py_XDECREF(a);
        }
    }
    Py_DECREF(src);
    Py_DECREF(sconn);
    return rc;
}

static int
grow_buf(Engine *e, Py_ssize_t need)
{
    if (need > e->bufcap) {
        unsigned char *nb = PyMem_Realloc(e->buf, (size_t)need);
        if (nb == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        e->buf = nb;
        e->bufcap = need;
    }
    return 0;
}

/* Move the slot's leftover to the front of the engine's buffer; returns its length. */
static Py_ssize_t
take_left(Engine *e, Slot *s)
{
    Py_ssize_t have = s->leftlen;
    if (have) {
        memcpy(e->buf, s->left, (size_t)have);
        PyMem_Free(s->left);
        s->left = NULL;
        s->leftlen = 0;
    }
    return have;
}

/* One read on slot idx and the packets in it.  Returns bytes read from the socket (>= 0)
 * or -1 with an exception set. */
static Py_ssize_t
deliver(Engine *e, int idx, Py_ssize_t end, int passthrough)
{
    Slot *s = &e->slots[idx];
    if (passthrough || s->pass_once)
        return hand_back(e, s, 0, e->buf, end);
    return process(e, idx, e->buf, end);
}

/* TLS: decrypt what the SSLObject holds after e->buf[0:have] (the leftover) and deliver it. */
static int
tls_deliver(Engine *e, int idx, Py_ssize_t have, int passthrough)
{
    Slot *s = &e->slots[idx];
    Py_ssize_t eof_end = 0;
    Py_ssize_t end = tls_decrypt(e, s, have, &eof_end);
    if (end == -1)
        return -1;
    if (end == -2) {
        if (eof_end < 0)
            return kill_slot(e, s, e->st->reason_read);
        return hand_back(e, s, 1, e->buf, eof_end);
    }
    if (end == 0)
        return 0;
    return deliver(e, idx, end, passthrough) < 0 ? -1 : 0;
}

static Py_ssize_t
read_slot(Engine *e, int idx, int passthrough)
{
    Slot *s = &e->slots[idx];
    if (grow_buf(e, s->leftlen + e->recv_size) < 0)
        return -1;
    Py_ssize_t have = s->leftlen;
    unsigned char *into = e->buf + have;
    if (s->tls != NULL) {
        if (e->raw == NULL && (e->raw = PyMem_Malloc((size_t)e->recv_size)) == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        into = e->raw;
    }
    ssize_t r;
    for (;;) {
        r = read(s->fd, into, (size_t)e->recv_size);
        if (r >= 0 || errno != EINTR)
            break;
    }
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return 0;
        return kill_slot(e, s, e->st->reason_read) < 0 ? -1 : 0;
    }
    take_left(e, s);
    if (r == 0)
        return hand_back(e, s, 1, e->buf, have) < 0 ? -1 : 0;
    if (s->tls != NULL) {
        PyObject *chunk = PyBytes_FromStringAndSize((const char *)e->raw, r);
        PyObject *res = chunk == NULL ? NULL : PyObject_CallOneArg(s->in_write, chunk);
        Py_XDECREF(chunk);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
        return tls_deliver(e, idx, have, passthrough) < 0 ? -1 : r;
    }
    return deliver(e, idx, have + r, passthrough) < 0 ? -1 : r;
}

/* Go on with the frames that waited for a full destination (one round each). */
static int
drain_backlog(Engine *e, int passthrough)
{
    int n = e->nbacklog;
    int rc = 0;
    e->nbacklog = 0;
    int *list = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(int));
    if (list == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(list, e->backlog, (size_t)n * sizeof(int));
    for (int i = 0; i < n; i++) {
        Slot *s = &e->slots[list[i]];
        if (!s->backlog)
            continue;
        s->backlog = 0;
        set_mask(e, s);
        if (rc < 0 || s->state != S_LIVE || !s->reading)
            continue;
        if (grow_buf(e, s->leftlen) < 0) {
            rc = -1;
            continue;
        }
        Py_ssize_t have = take_left(e, s);
        if (s->tls != NULL)
            rc = tls_deliver(e, list[i], have, passthrough);
        else if (have)
            rc = deliver(e, list[i], have, passthrough) < 0 ? -1 : 0;
        if (rc < 0)
            rc = contain(e, s);
        if (rc == 0 && e->ndirty && flush_dirty(e) < 0)
            rc = -1;
    }
    PyMem_Free(list);
    return rc;
}

/* ------------------------------------------------------------------ the type */

/* An Engine made with Engine.__new__ and never initialised (or whose __init__ failed) has no
 * depth, no buffers and no epoll set: every method refuses it. */
static int
not_ready(Engine *e)
{
    if (e->depth > 0 && e->active != NULL)
        return 0;
    PyErr_SetString(PyExc_RuntimeError, "Engine is not initialised");
    return 1;
}

#define REQUIRE_READY(e)                                                                                         \
    if (not_ready(e))                                                                                            \
        return NULL;

/* The rule for callbacks: what poll() calls (watch, note_activity, a connection's enqueue and
 * attributes, the SSLObject) never re-enters the engine in a way that changes its slots --
 * add(), remove(), resume(), expire(), poll() -- since poll() holds pointers into the slot
 * table and add() may move it.  Enforced: those methods raise inside poll(), and the
 * exception closes the connection being served (see contain()). */
#define NOT_IN_POLL(e, name)                                                                                    \
    if ((e)->in_poll) {                                                                                         \
        PyErr_SetString(PyExc_RuntimeError, name "(): callbacks of poll() must not re-enter the engine");     \
        return NULL;                                                                                            \
    }

static PyObject *
take_events(Engine *e)
{
    PyObject *ev = e->events;
    e->events = NULL;
    if (ev == NULL)
        Py_RETURN_NONE;
    return ev;
}

#define WAKE_TOKEN UINT64_MAX

/* Make the epoll descriptor readable, so that the Trio side calls poll(). */
static void
wake(Engine *e)
{
    uint64_t one = 1;
    ssize_t r = write(e->wakefd, &one, sizeof one); /* EAGAIN: the counter is already set */
    (void)r;
}

static Slot *
event_slot(Engine *e, struct epoll_event *ev)
{
    uint32_t idx = (uint32_t)ev->data.u64;
    uint32_t gen = (uint32_t)(ev->data.u64 >> 32);
    if (idx >= (uint32_t)e->nslots) /* also WAKE_TOKEN */
        return NULL;
    Slot *s = &e->slots[idx];
    return s->state == S_LIVE && s->gen == gen ? s : NULL;
}

static PyObject *
Engine_poll(Engine *e, PyObject *arg)
{
    REQUIRE_READY(e);
    int passthrough = PyObject_IsTrue(arg);
    if (passthrough < 0)
        return NULL;
    NOT_IN_POLL(e, "poll");
    if (tick(e) < 0)
        return NULL;
    struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(e->epfd, evs, MAX_EVENTS, 0);
    if (n < 0) {
        if (errno == EINTR)
            n = 0;
        else
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    e->in_poll = 1;
    e->frames_left = POLL_FRAME_BUDGET;
    int rc = 0;
    /* writes first: a destination that drains makes room for what the backlog holds */
    for (int i = 0; i < n && rc == 0; i++) {
        Slot *s = event_slot(e, &evs[i]);
        if (s == NULL && evs[i].data.u64 == WAKE_TOKEN) {
            uint64_t v;
            ssize_t r = read(e->wakefd, &v, sizeof v); /* reset: the backlog is served below */
            (void)r;
        } else if (s != NULL && s->blocked && (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) && flush_slot(e, s) < 0) {
            rc = contain(e, s);
        }
    }
    if (e->nbroken) { /* writes that failed outside poll(): close their paths now */
        e->nbroken = 0;
        for (int i = 0; i < e->nslots && rc == 0; i++)
            if (e->slots[i].state == S_LIVE && e->slots[i].broken)
                rc = kill_slot(e, &e->slots[i], e->st->reason_write);
    }
    if (rc == 0 && e->nbacklog && drain_backlog(e, passthrough) < 0)
        rc = -1;
    Py_ssize_t budget = POLL_BYTE_BUDGET;
    for (int i = 0; i < n && rc == 0 && budget > 0 && e->frames_left > 0; i++) {
        Slot *s = event_slot(e, &evs[i]);
        if (s == NULL)
            continue;
        uint32_t what = evs[i].events;
        if (s->reading && !s->backlog && (what & (EPOLLIN | EPOLLERR | EPOLLHUP))) {
            Py_ssize_t got = read_slot(e, (int)(s - e->slots), passthrough);
            if (got < 0)
                rc = contain(e, s);
            else
                budget -= got;
            /* this sender's packets go out now, not after every other socket's: latency */
            if (rc == 0 && e->ndirty && flush_dirty(e) < 0)
                rc = -1;
        } else if (!s->reading && !s->blocked && (what & (EPOLLERR | EPOLLHUP))) {
            rc = kill_slot(e, s, e->st->reason_read);
        }
    }
    if (flush_dirty(e) < 0)
        rc = -1;
    e->in_poll = 0;
    if (flush_counters(e) < 0)
        rc = -1;
    if (rc < 0)
        return NULL;
    return take_events(e);
}

static PyObject *
Engine_add(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_READY(e);
    NOT_IN_POLL(e, "add");
    if (nargs < 4 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "add(fd, conn, key, saw_src[, (sslobject, incoming, outgoing)])");
        return NULL;
    }
    PyObject *conn = args[1], *key = args[2], *saw = args[3];
    PyObject *tls = nargs == 5 && args[4] != Py_None ? args[4] : NULL;
    if (tls != NULL && (!PyTuple_Check(tls) || PyTuple_GET_SIZE(tls) != 3)) {
        PyErr_SetString(PyExc_TypeError, "add(): tls must be (sslobject, incoming, outgoing)");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != KEY_LEN) {
        PyErr_SetString(PyExc_TypeError, "add(): key must be 32 bytes");
        return NULL;
    }
    if (!PyAnySet_Check(saw)) {
        PyErr_SetString(PyExc_TypeError, "add(): saw_src must be a set");
        return NULL;
    }
    int known = PyDict_Contains(e->owned, conn);
    if (known < 0)
        return NULL;
    if (known) {
        PyErr_SetString(PyExc_ValueError, "add(): this connection already has a slot");
        return NULL;
    }
    /* TLS: the methods the engine calls, bound once (the SSLObject's read, write and pending;
     * the incoming BIO's write; the outgoing BIO's read) */
    PyObject *bound[5] = {NULL, NULL, NULL, NULL, NULL};
    if (tls != NULL) {
        PyObject *owner[5] = {PyTuple_GET_ITEM(tls, 0), PyTuple_GET_ITEM(tls, 0), PyTuple_GET_ITEM(tls, 0),
                              PyTuple_GET_ITEM(tls, 1), PyTuple_GET_ITEM(tls, 2)};
        PyObject *name[5] = {e->st->str_read, e->st->str_write, e->st->str_pending, e->st->str_write, e->st->str_read};
        for (int i = 0; i < 5; i++) {
            if ((bound[i] = PyObject_GetAttr(owner[i], name[i])) == NULL) {
                for (int j = 0; j < i; j++)
                    Py_DECREF(bound[j]);
                return NULL;
            }
        }
    }
    if (e->free_head < 0 && e->nslots == e->cap) {
        int ncap = e->cap ? e->cap * 2 : 64;
        Slot *ns = PyMem_Realloc(e->slots, (size_t)ncap * sizeof(Slot));
        if (ns != NULL)
            e->slots = ns;
        int *nd = PyMem_Realloc(e->dirty, (size_t)ncap * sizeof(int));
        if (nd != NULL)
            e->dirty = nd;
        int *nb = PyMem_Realloc(e->backlog, (size_t)ncap * sizeof(int));
        if (nb != NULL)
            e->backlog = nb;
        if (ns == NULL || nd == NULL || nb == NULL) {
            for (int j = 0; j < 5; j++)
                Py_XDECREF(bound[j]);
            return PyErr_NoMemory();
        }
        e->cap = ncap;
    }
    int idx = e->free_head >= 0 ? e->free_head : e->nslots;
    PyObject *index = PyLong_FromLong(idx);
    if (index == NULL || PyDict_SetItem(e->owned, conn, index) < 0) {
        Py_XDECREF(index);
        for (int j = 0; j < 5; j++)
            Py_XDECREF(bound[j]);
        return NULL;
    }
    /* committed: nothing below fails */
    if (e->free_head >= 0) {
        e->free_head = e->slots[idx].next_free;
    } else {
        e->nslots++;
        e->slots[idx].gen = 0;
    }
    Slot *s = &e->slots[idx];
    uint32_t gen = s->gen + 1;
    memset(s, 0, sizeof *s);
    s->gen = gen;
    s->state = S_LIVE;
    s->fd = fd;
    s->mask = -1;
    s->next_free = -1;
    s->conn = Py_NewRef(conn);
    s->key = Py_NewRef(key);
    s->saw = Py_NewRef(saw);
    if (tls != NULL) {
        s->tls = Py_NewRef(PyTuple_GET_ITEM(tls, 0));
        s->tls_in = Py_NewRef(PyTuple_GET_ITEM(tls, 1));
        s->tls_out = Py_NewRef(PyTuple_GET_ITEM(tls, 2));
        s->tls_read = bound[0];
        s->tls_write = bound[1];
        s->tls_pending = bound[2];
        s->in_write = bound[3];
        s->out_read = bound[4];
    }
    return index;
}

static PyObject *
Engine_resume(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_READY(e);
    NOT_IN_POLL(e, "resume");
    if (nargs < 2 || nargs > 3 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "resume(slot, bytes[, pass_once])");
        return NULL;
    }
    int pass_once = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (pass_once < 0)
        return NULL;
    Slot *s = get_slot(e, args[0]);
    if (s == NULL)
        return NULL;
    if (s->state != S_LIVE)
        Py_RETURN_NONE;
    Py_ssize_t n = PyBytes_GET_SIZE(args[1]);
    PyMem_Free(s->left);
    s->left = NULL;
    s->leftlen = 0;
    if (n) {
        s->left = PyMem_Malloc((size_t)n);
        if (s->left == NULL)
            return PyErr_NoMemory();
        memcpy(s->left, PyBytes_AS_STRING(args[1]), (size_t)n);
        s->leftlen = n;
    }
    s->reading = 1;
    s->pass_once = pass_once;
    if (s->tls != NULL && !s->backlog) {
        /* records already in the SSLObject (read by trio before the takeover) need no socket
         * event: let the next poll() decrypt them */
        PyObject *p = PyObject_CallNoArgs(s->tls_pending);
        PyObject *q = p == NULL ? NULL : PyObject_GetAttr(s->tls_in, e->st->str_pending);
        long more = (p == NULL || q == NULL) ? -1 : PyLong_AsLong(p) + PyLong_AsLong(q);
        Py_XDECREF(p);
        Py_XDECREF(q);
        if (more < 0 && PyErr_Occurred())
            return NULL;
        if (more > 0) {
            s->backlog = 1;
            e->backlog[e->nbacklog++] = (int)(s - e->slots);
            /* the Trio side may be waiting for the epoll descriptor, and no socket event will
             * come for these records: without this they waited for another client's traffic */
            wake(e);
        }
    }
    set_mask(e, s);
    Py_RETURN_NONE;
}

/* Count every packet still queued on s (rings and a partly written packet) as dropped for
 * ``reason`` and let them go. */
static void
drop_queued(Engine *e, Slot *s, int reason)
{
    ring_clear(e, &s->q, 0, reason);
    ring_clear(e, &s->dq, 1, reason);
    s->qd_frame = NULL;
    if (s->partial != NULL && s->partial_pkt) {
        e->drop_n[reason][0]++;
        e->drop_b[reason][0] += PyBytes_GET_SIZE(s->partial) - RECV_OVERHEAD;
        s->partial_pkt = 0;
    }
}

/* Everything a slot owns (after drop_queued, the rings are empty). */
static void
release_slot(Engine *e, Slot *s)
{
    for (int k = 0; k < 2; k++) {
        Ring *r = k ? &s->dq : &s->q;
        while (r->len > 0)
            Py_DECREF(ring_pop(r, e->depth));
        PyMem_Free(r->items);
        r->items = NULL;
    }
    PyMem_Free(s->left);
    s->left = NULL;
    Py_CLEAR(s->partial);
    Py_CLEAR(s->ctl);
    Py_CLEAR(s->conn);
    Py_CLEAR(s->key);
    Py_CLEAR(s->saw);
    Py_CLEAR(s->tls);
    Py_CLEAR(s->tls_in);
    Py_CLEAR(s->tls_out);
    Py_CLEAR(s->tls_read);
    Py_CLEAR(s->tls_write);
    Py_CLEAR(s->tls_pending);
    Py_CLEAR(s->in_write);
    Py_CLEAR(s->out_read);
    Py_CLEAR(s->tls_more);
}

/* Take idx out of an unordered index list (the dirty and backlog lists). */
static void
list_discard(int *list, int *n, int idx)
{
    for (int i = 0; i < *n; i++) {
        if (list[i] == idx) {
            list[i] = list[--*n];
            return;
        }
    }
}

static PyObject *
Engine_remove(Engine *e, PyObject *arg)
{
    REQUIRE_READY(e);
    NOT_IN_POLL(e, "remove");
    Slot *s = get_slot(e, arg);
    if (s == NULL)
        return NULL;
    int idx = (int)(s - e->slots);
    /* the conn -> slot entry goes first (a failure here changes nothing: slot_of checks identity) */
    if (PyDict_DelItem(e->owned, s->conn) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError))
            return NULL;
        PyErr_Clear();
    }
    s->state = S_DEAD;
    s->reading = s->blocked = 0;
    set_mask(e, s);
    drop_queued(e, s, DROP_GONE);
    release_slot(e, s);
    uint32_t gen = s->gen;
    int dirty = s->dirty, backlog = s->backlog;
    memset(s, 0, sizeof *s);
    s->gen = gen;
    s->state = S_FREE;
    s->mask = -1;
    if (dirty)
        list_discard(e->dirty, &e->ndirty, idx);
    if (backlog)
        list_discard(e->backlog, &e->nbacklog, idx);
    s->next_free = e->free_head;
    e->free_head = idx;
    if (flush_counters(e) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Engine_enqueue(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_READY(e);
    if (nargs != 3 || !PyBytes_Check(args[1]) || PyBytes_GET_SIZE(args[1]) < RECV_OVERHEAD) {
        PyErr_SetString(PyExc_TypeError, "enqueue(slot, frame, disco)");
        return NULL;
    }
    Slot *s = get_slot(e, args[0]);
    if (s == NULL)
        return NULL;
    int disco = PyObject_IsTrue(args[2]);
    if (disco < 0)
        return NULL;
    if (!e->in_poll && tick(e) < 0) /* inside poll(): poll()'s reading holds */
        return NULL;
    int full = enqueue_slot(e, s, args[1], disco);
    if (flush_counters(e) < 0 || full < 0)
        return NULL;
    return PyBool_FromLong(full);
}

static PyObject *
Engine_send_control(Engine *e, PyObject *const *args, Py_ssize_t nargs)
{
    REQUIRE_READY(e);
    if (nargs != 2 || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "send_control(slot, frame)");
        return NULL;
    }
    Slot *s = get_slot(e, args[0]);
    if (s == NULL)
        return NULL;
    if (s->state != S_LIVE)
        Py_RETURN_NONE;
    if (!e->in_poll && tick(e) < 0)
        return NULL;
    if (s->ctl == NULL && (s->ctl = PyList_New(0)) == NULL)
        return NULL;
    if (PyList_Append(s->ctl, args[1]) < 0)
        return NULL;
    if (!s->blocked) {
        if (e->in_poll) {
            if (mark_dirty(e, s) < 0)
                return NULL;
        } else if (flush_slot(e, s) < 0) {
            return NULL;
        }
    }
    if (flush_counters(e) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Engine_pending(Engine *e, PyObject *arg)
{
    REQUIRE_READY(e);
    Slot *s = get_slot(e, arg);
    if (s == NULL)
        return NULL;
    int any = s->partial != NULL || (s->ctl != NULL && PyList_GET_SIZE(s->ctl) > 0) || s->q.len > 0 || s->dq.len > 0;
    return PyBool_FromLong(any && s->state == S_LIVE);
}

static PyObject *
Engine_expire(Engine *e, PyObject *arg)
{
    REQUIRE_READY(e);
    NOT_IN_POLL(e, "expire");
    double timeout = PyFloat_AsDouble(arg);
    if (timeout == -1.0 && PyErr_Occurred())
        return NULL;
    if (tick(e) < 0)
        return NULL;
    double now = e->now;
    for (int i = 0; i < e->nslots; i++) {
        Slot *s = &e->slots[i];
        if (s->state != S_LIVE || !s->blocked || now - s->blocked_since < timeout)
            continue;
        drop_queued(e, s, DROP_WRITE_ERROR);
        if (kill_slot(e, s, e->st->reason_timeout) < 0)
            return NULL;
    }
    if (flush_counters(e) < 0)
        return NULL;
    return take_events(e);
}

static PyObject *
Engine_slot_stats(Engine *e, PyObject *arg)
{
    REQUIRE_READY(e);
    Slot *s = get_slot(e, arg);
    if (s == NULL)
        return NULL;
    Py_ssize_t nctl = (s->ctl ? PyList_GET_SIZE(s->ctl) : 0) + (s->partial != NULL);
    return Py_BuildValue("(iinLLLLL)", s->q.len, s->dq.len, nctl, s->rx_pk, s->rx_by, s->tx_pk, s->tx_by,
                         s->drop_full);
}

static PyObject *
Engine_queue_delay(Engine *e, PyObject *Py_UNUSED(ignored))
{
    REQUIRE_READY(e);
    PyObject *bounds = PyTuple_New(QD_N), *counts = PyTuple_New(QD_N + 1);
    if (bounds == NULL || counts == NULL)
        goto fail;
    for (int i = 0; i <= QD_N; i++) {
        PyObject *c = PyLong_FromLongLong(e->qd_counts[i]);
        if (c == NULL)
            goto fail;
        PyTuple_SET_ITEM(counts, i, c);
        if (i < QD_N) {
            PyObject *b = PyFloat_FromDouble(qd_bounds[i]);
            if (b == NULL)
                goto fail;
            PyTuple_SET_ITEM(bounds, i, b);
        }
    }
    return Py_BuildValue("(NNd)", bounds, counts, e->qd_sum);
fail:
    Py_XDECREF(bounds);
    Py_XDECREF(counts);
    return NULL;
}

static PyObject *
Engine_backlogged(Engine *e, PyObject *Py_UNUSED(ignored))
{
    REQUIRE_READY(e);
    return PyBool_FromLong(e->nbacklog > 0);
}

static PyObject *
Engine_fileno(Engine *e, PyObject *unused)
{
    REQUIRE_READY(e);
    return PyLong_FromLong(e->epfd);
}

static PyObject *
Engine_count(Engine *e, PyObject *unused)
{
    REQUIRE_READY(e);
    long live = 0;
    for (int i = 0; i < e->nslots; i++)
        live += e->slots[i].state != S_FREE;
    return PyLong_FromLong(live);
}

/* The callbacks the engine calls, in CONTRACT["callbacks"] order: every one is required. */
#define N_CALLBACKS 6
static const char *callback_names[N_CALLBACKS] = {"watch", "note_activity", "enqueue", "count", "drop", "clock"};

static int
Engine_init(Engine *e, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"active", "watch", "note_activity", "enqueue", "count", "drop", "clock", "disco_magic",
                             "disco_min_len", "send_limit", "depth", "recv_size", NULL};
    PyObject *active, *magic = NULL;
    PyObject *cb[N_CALLBACKS] = {NULL, NULL, NULL, NULL, NULL, NULL};
    Py_ssize_t disco_min = -1, recv_size = 0;
    long long send_limit = -1;
    int depth = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!|$OOOOOOO!nLin", kwlist, &PyDict_Type, &active, &cb[0], &cb[1],
                                     &cb[2], &cb[3], &cb[4], &cb[5], &PyBytes_Type, &magic, &disco_min, &send_limit,
                                     &depth, &recv_size))
        return -1;
    for (int i = 0; i < N_CALLBACKS; i++) {
        if (cb[i] == NULL || !PyCallable_Check(cb[i])) {
            PyErr_Format(PyExc_TypeError, "Engine(): %s must be given, and callable", callback_names[i]);
            return -1;
        }
    }
    if (magic == NULL || disco_min < 0 || send_limit < 0) {
        PyErr_SetString(PyExc_TypeError, "Engine(): disco_magic, disco_min_len and send_limit must be given");
        return -1;
    }
    if (e->depth != 0) {
        /* the rings were sized for the first depth: a second __init__ would index them with
         * the new one */
        PyErr_SetString(PyExc_RuntimeError, "Engine is already initialised");
        return -1;
    }
    if (depth < 1 || recv_size < 1) {
        PyErr_SetString(PyExc_ValueError, "depth and recv_size must be positive");
        return -1;
    }
    if (e->epfd < 0) {
        e->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (e->epfd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    if (e->wakefd < 0) {
        e->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (e->wakefd < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        struct epoll_event ev;
        memset(&ev, 0, sizeof ev);
        ev.events = EPOLLIN;
        ev.data.u64 = WAKE_TOKEN;
        if (epoll_ctl(e->epfd, EPOLL_CTL_ADD, e->wakefd, &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            close(e->wakefd);
            e->wakefd = -1;
            return -1;
        }
    }
    PyObject *owned = PyDict_New();
    if (owned == NULL)
        return -1;
    Py_XSETREF(e->owned, owned);
    Py_XSETREF(e->active, Py_NewRef(active));
    Py_XSETREF(e->watch, Py_NewRef(cb[0]));
    Py_XSETREF(e->note_activity, Py_NewRef(cb[1]));
    Py_XSETREF(e->enqueue_other, Py_NewRef(cb[2]));
    Py_XSETREF(e->count, Py_NewRef(cb[3]));
    Py_XSETREF(e->drop, Py_NewRef(cb[4]));
    Py_XSETREF(e->clock, Py_NewRef(cb[5]));
    Py_XSETREF(e->magic, Py_NewRef(magic));
    e->disco_min = disco_min;
    e->send_limit = send_limit;
    e->depth = depth;
    e->flush_at = depth / 2 > 0 ? depth / 2 : 1;
    e->recv_size = recv_size;
    return 0;
}

static struct PyModuleDef module;

static PyObject *
Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *m = PyType_GetModuleByDef(type, &module);
    if (m == NULL)
        return NULL;
    Engine *e = (Engine *)type->tp_alloc(type, 0);
    if (e != NULL) {
        e->st = PyModule_GetState(m);
        e->epfd = -1;
        e->wakefd = -1;
        e->free_head = -1;
    }
    return (PyObject *)e;
}

/* The garbage collector's view.  An Engine holds its connections, which (through the relay
 * that owns the engine) hold it: a cycle the collector must be able to see and break. */
static int
Engine_traverse(Engine *e, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(e));
    Py_VISIT(e->active);
    Py_VISIT(e->watch);
    Py_VISIT(e->note_activity);
    Py_VISIT(e->enqueue_other);
    Py_VISIT(e->count);
    Py_VISIT(e->drop);
    Py_VISIT(e->clock);
    Py_VISIT(e->owned);
    Py_VISIT(e->events);
    for (int i = 0; i < e->nslots; i++) {
        Slot *s = &e->slots[i];
        if (s->state == S_FREE)
            continue;
        Py_VISIT(s->conn);
        Py_VISIT(s->saw);
        Py_VISIT(s->ctl);
        Py_VISIT(s->tls);
        Py_VISIT(s->tls_in);
        Py_VISIT(s->tls_out);
        Py_VISIT(s->tls_read);
        Py_VISIT(s->tls_write);
        Py_VISIT(s->tls_pending);
        Py_VISIT(s->in_write);
        Py_VISIT(s->out_read);
    }
    return 0;
}

/* Break the cycles: every slot let go, the callbacks dropped.  Afterwards the engine refuses
 * every method (not_ready), as one never initialised does; poll() is never running here (a
 * running poll() keeps the engine reachable). */
static int
Engine_clear(Engine *e)
{
    for (int i = 0; i < e->nslots; i++) {
        Slot *s = &e->slots[i];
        if (s->state != S_FREE)
            release_slot(e, s);
        s->state = S_FREE;
    }
    e->nslots = e->ndirty = e->nbacklog = 0;
    e->free_head = -1;
    Py_CLEAR(e->events);
    Py_CLEAR(e->active);
    Py_CLEAR(e->watch);
    Py_CLEAR(e->note_activity);
    Py_CLEAR(e->enqueue_other);
    Py_CLEAR(e->count);
    Py_CLEAR(e->drop);
    Py_CLEAR(e->clock);
    Py_CLEAR(e->owned);
    Py_CLEAR(e->magic);
    return 0;
}

static void
Engine_dealloc(Engine *e)
{
    PyTypeObject *tp = Py_TYPE(e);
    PyObject_GC_UnTrack(e);
    Engine_clear(e);
    PyMem_Free(e->slots);
    PyMem_Free(e->raw);
    PyMem_Free(e->dirty);
    PyMem_Free(e->backlog);
    PyMem_Free(e->buf);
    if (e->epfd >= 0)
        close(e->epfd);
    if (e->wakefd >= 0)
        close(e->wakefd);
    tp->tp_free((PyObject *)e);
    Py_DECREF(tp);
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The epoll descriptor (readable when poll() has work)."},
    {"add", (PyCFunction)(void (*)(void))Engine_add, METH_FASTCALL,
     "add(fd, conn, key, saw_src[, (sslobject, incoming, outgoing)]) -> slot (not reading yet)"},
    {"resume", (PyCFunction)(void (*)(void))Engine_resume, METH_FASTCALL, "resume(slot, leftover): read again"},
    {"remove", (PyCFunction)Engine_remove, METH_O, "remove(slot): forget it; queued packets count as dropped"},
    {"enqueue", (PyCFunction)(void (*)(void))Engine_enqueue, METH_FASTCALL, "enqueue(slot, frame, disco) -> full"},
    {"send_control", (PyCFunction)(void (*)(void))Engine_send_control, METH_FASTCALL, "send_control(slot, frame)"},
    {"pending", (PyCFunction)Engine_pending, METH_O, "pending(slot) -> anything queued or being written"},
    {"poll", (PyCFunction)Engine_poll, METH_O, "poll(passthrough) -> events or None"},
    {"expire", (PyCFunction)Engine_expire, METH_O, "expire(timeout) -> events or None"},
    {"count", (PyCFunction)Engine_count, METH_NOARGS, "slots in use"},
    {"slot_stats", (PyCFunction)Engine_slot_stats, METH_O, "slot_stats(slot) -> queue depths and totals"},
    {"queue_delay", (PyCFunction)Engine_queue_delay, METH_NOARGS, "queue_delay() -> (bounds, counts, sum)"},
    {"backlogged", (PyCFunction)Engine_backlogged, METH_NOARGS, "frames wait for a full destination: poll again soon"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot Engine_slots[] = {
    {Py_tp_doc, "The relay's packet path for plain-TCP and TLS clients (see derpd/relay/dataplane.py)."},
    {Py_tp_new, Engine_new},
    {Py_tp_init, Engine_init},
    {Py_tp_dealloc, Engine_dealloc},
    {Py_tp_traverse, Engine_traverse},
    {Py_tp_clear, Engine_clear},
    {Py_tp_methods, Engine_methods},
    {0, NULL},
};

static PyType_Spec Engine_spec = {
    .name = "derpd._dataplane.Engine",
    .basicsize = sizeof(Engine),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = Engine_slots,
};

/* CONTRACT: every name the engine uses on an object Python gave it (tests/derpd/test_contract.py
 * checks each against its declaration: derpd/relay/dataplane.py and the ssl module).
 *   connection     attributes read or methods called on a connection: none (an opaque token)
 *   add            what add() takes from a connection, by the caller (EngineConnection members)
 *   callbacks      Engine()'s callables, every one required
 *   ssl.SSLObject, ssl.MemoryBIO   the methods bound at add() for a TLS slot, and the BIO's
 *                  ``pending`` property read at resume() */
static int
add_contract(PyObject *m)
{
    PyObject *callbacks = PyTuple_New(N_CALLBACKS);
    if (callbacks == NULL)
        return -1;
    for (int i = 0; i < N_CALLBACKS; i++) {
        PyObject *name = PyUnicode_FromString(callback_names[i]);
        if (name == NULL) {
            Py_DECREF(callbacks);
            return -1;
        }
        PyTuple_SET_ITEM(callbacks, i, name);
    }
    PyObject *contract = Py_BuildValue("{s:(),s:(ss),s:O,s:(sss),s:(sss)}", "connection", "add", "key", "saw_src",
                                       "callbacks", callbacks, "ssl.SSLObject", "read", "write", "pending",
                                       "ssl.MemoryBIO", "read", "write", "pending");
    Py_DECREF(callbacks);
    if (contract == NULL)
        return -1;
    int rc = PyModule_AddObjectRef(m, "CONTRACT", contract);
    Py_DECREF(contract);
    return rc;
}

#define INTERN(field, text)                                                                                      \
    if ((st->field = PyUnicode_InternFromString(text)) == NULL)                                                 \
        return -1;

static int
dp_exec(PyObject *m)
{
    dp_state *st = PyModule_GetState(m);
    INTERN(reason_read, "read_error");
    INTERN(reason_write, "write_error");
    INTERN(reason_timeout, "write_timeout");
    INTERN(reason_tls_limit, "tls_output_limit");
    INTERN(str_write, "write");
    INTERN(str_read, "read");
    INTERN(str_pending, "pending");
    PyObject *ssl = PyImport_ImportModule("ssl");
    if (ssl == NULL)
        return -1;
    st->exc_want_read = PyObject_GetAttrString(ssl, "SSLWantReadError");
    st->exc_zero_return = PyObject_GetAttrString(ssl, "SSLZeroReturnError");
    Py_DECREF(ssl);
    if (st->exc_want_read == NULL || st->exc_zero_return == NULL)
        return -1;
    st->engine_type = PyType_FromModuleAndSpec(m, &Engine_spec, NULL);
    if (st->engine_type == NULL)
        return -1;
    if (PyModule_AddType(m, (PyTypeObject *)st->engine_type) < 0)
        return -1;
    return add_contract(m);
}

#define STATE_FIELDS(X)                                                                                          \
    X(engine_type) X(reason_read) X(reason_write) X(reason_timeout) X(reason_tls_limit) X(str_write) X(str_read)              \
    X(str_pending) X(exc_want_read) X(exc_zero_return)

static int
dp_traverse(PyObject *m, visitproc visit, void *arg)
{
    dp_state *st = PyModule_GetState(m);
#define VISIT(f) Py_VISIT(st->f);
    STATE_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int
dp_clear(PyObject *m)
{
    dp_state *st = PyModule_GetState(m);
#define CLEAR(f) Py_CLEAR(st->f);
    STATE_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void
dp_free(void *m)
{
    dp_clear((PyObject *)m);
}

static PyModuleDef_Slot dp_slots[] = {
    {Py_mod_exec, dp_exec},
#ifdef Py_mod_gil
    /* every Engine call relies on the GIL: one thread at a time in the engine */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "derpd._dataplane",
    .m_size = sizeof(dp_state),
    .m_slots = dp_slots,
    .m_traverse = dp_traverse,
    .m_clear = dp_clear,
    .m_free = dp_free,
};

PyMODINIT_FUNC
PyInit__dataplane(void)
{
    return PyModuleDef_Init(&module);
}
