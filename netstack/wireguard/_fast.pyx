# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Cython hot path of WireGuard's transport messages; twin of
``netstack/wireguard/_pure.py`` (same functions, same results), chosen by
``netstack/wireguard/speedups.py``.

``TransportCipher`` seals and opens one session's transport messages with OpenSSL's
libcrypto called directly (one EVP context per session); ``open_run`` / ``seal_run``
take a whole batch of one peer's messages per call.  It stands on its own: nothing
here, nor in its twin, belongs to the TCP/IP stack's hot path (``netstack/_fast.pyx``).
"""

from libc.stdint cimport uint64_t

# ---------------------------------------------------------------- WireGuard transport
#
# Theory of operation: a WireGuard transport message (whitepaper 5.4.6) is a 16-byte
# header (type 4, three zero bytes, the receiver's index, the 64-bit little-endian
# counter) followed by ChaCha20-Poly1305 of the zero-padded IP packet under the nonce
# 32 zero bits || counter.  ``cryptography``'s AEAD call costs about 1 us of fixed
# overhead per packet (argument checks, a fresh output object, context set-up), more
# than the cipher itself on a 1420-byte packet.  Here one OpenSSL EVP context is keyed
# once per session and only the nonce is set per packet; the header, padding and
# ciphertext are written into a single bytes object, decryption writes straight into
# the plaintext object.  Twin: ``TransportCipher`` in ``netstack/wireguard/_pure.py``.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.string cimport memcmp, memcpy, memset


cdef extern from "openssl/evp.h":
    ctypedef struct EVP_CIPHER_CTX:
        pass
    ctypedef struct EVP_CIPHER:
        pass
    ctypedef struct ENGINE:
        pass
    EVP_CIPHER_CTX *EVP_CIPHER_CTX_new() nogil
    void EVP_CIPHER_CTX_free(EVP_CIPHER_CTX *ctx) nogil
    const EVP_CIPHER *EVP_chacha20_poly1305() nogil
    int EVP_CipherInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *cipher, ENGINE *impl,
                          const unsigned char *key, const unsigned char *iv, int enc) nogil
    int EVP_CipherUpdate(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl,
                         const unsigned char *inp, int inl) nogil
    int EVP_CipherFinal_ex(EVP_CIPHER_CTX *ctx, unsigned char *out, int *outl) nogil
    int EVP_CIPHER_CTX_ctrl(EVP_CIPHER_CTX *ctx, int type, int arg, void *ptr) nogil
    int EVP_CTRL_AEAD_GET_TAG
    int EVP_CTRL_AEAD_SET_TAG


DEF _TAG = 16
DEF _HEADER = 16


cdef inline void _nonce(unsigned char *nonce, uint64_t counter) noexcept nogil:
    cdef int i
    memset(nonce, 0, 4)
    for i in range(8):
        nonce[4 + i] = (counter >> (8 * i)) & 0xFF


cdef class TransportCipher:
    """ChaCha20-Poly1305 under one WireGuard session key, as transport messages use it."""

    cdef EVP_CIPHER_CTX *_ctx
    cdef int _mode  # -1 not keyed yet, 1 sealing, 0 opening
    cdef bytes _key

    def __cinit__(self, bytes key not None):
        if len(key) != 32:
            raise ValueError("a transport key is 32 bytes")
        self._ctx = EVP_CIPHER_CTX_new()
        if self._ctx == NULL:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._mode = -1
        self._key = key

    def __dealloc__(self):
        if self._ctx != NULL:
            EVP_CIPHER_CTX_free(self._ctx)  # also wipes the key schedule
            self._ctx = NULL

    cdef int _key_for(self, int mode) except -1:
        if self._mode == mode:
            return 0
        if EVP_CipherInit_ex(self._ctx, EVP_chacha20_poly1305(), NULL,
                             <const unsigned char *>PyBytes_AS_STRING(self._key), NULL, mode) != 1:
            raise RuntimeError("EVP_CipherInit_ex failed")
        self._mode = mode
        return 0

    def seal(self, uint64_t receiver, uint64_t counter, packet, Py_ssize_t mtu):
        """The whole transport message for ``packet``: header, zero padding to a multiple
        of 16 within ``mtu`` (wireguard-go's calculatePaddingSize), ciphertext, tag."""
        cdef const unsigned char[:] view = packet
        cdef Py_ssize_t size = view.shape[0]
        return self._seal(receiver, counter, &view[0] if size else NULL, size, mtu)

    cdef bytes _seal(self, uint64_t receiver, uint64_t counter, const unsigned char *data,
                     Py_ssize_t size, Py_ssize_t mtu):
        cdef Py_ssize_t last_unit, padded, pad
        if mtu <= 0:
            pad = (-size) & 15
        else:
            last_unit = size % mtu if size > mtu else size
            padded = (last_unit + 15) & ~15
            pad = (padded if padded < mtu else mtu) - last_unit
        cdef Py_ssize_t plain = size + pad
        if plain > 0x7FFFFFF0:
            raise ValueError("packet too large")
        self._key_for(1)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, _HEADER + plain + _TAG)
        cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
        cdef unsigned char nonce[12]
        cdef int outl = 0
        cdef int i
        cdef int ok
        p[0] = 4
        p[1] = 0
        p[2] = 0
        p[3] = 0
        for i in range(4):
            p[4 + i] = (receiver >> (8 * i)) & 0xFF
        for i in range(8):
            p[8 + i] = (counter >> (8 * i)) & 0xFF
        if size:
            memcpy(p + _HEADER, data, size)
        if pad:
            memset(p + _HEADER + size, 0, pad)
        _nonce(nonce, counter)
        with nogil:
            ok = EVP_CipherInit_ex(self._ctx, NULL, NULL, NULL, nonce, 1)
            if ok == 1 and plain:
                ok = EVP_CipherUpdate(self._ctx, p + _HEADER, &outl, p + _HEADER, <int>plain)
            if ok == 1:
                ok = EVP_CipherFinal_ex(self._ctx, p + _HEADER + outl, &outl)
            if ok == 1:
                ok = EVP_CIPHER_CTX_ctrl(self._ctx, EVP_CTRL_AEAD_GET_TAG, _TAG,
                                         p + _HEADER + plain)
        if ok != 1:
            raise RuntimeError("ChaCha20-Poly1305 encryption failed")
        return out

    def open(self, uint64_t counter, data):
        """The plaintext of the transport message ``data`` (header included), or None
        when it does not authenticate."""
        cdef const unsigned char[:] view = data
        cdef Py_ssize_t size = view.shape[0]
        if size == 0:
            return None
        return self._open(counter, &view[0], size)

    cdef object _open(self, uint64_t counter, const unsigned char *data, Py_ssize_t size):
        if size < _HEADER + _TAG or size - _HEADER - _TAG > 0x7FFFFFF0:
            return None
        cdef Py_ssize_t plain = size - _HEADER - _TAG
        self._key_for(0)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, plain)
        cdef unsigned char *p = <unsigned char *>PyBytes_AS_STRING(out)
        cdef unsigned char nonce[12]
        cdef unsigned char tag[_TAG]
        cdef unsigned char scratch[16]
        cdef int outl = 0
        cdef int final = 0
        cdef int ok
        memcpy(tag, data + size - _TAG, _TAG)
        _nonce(nonce, counter)
        with nogil:
            ok = EVP_CipherInit_ex(self._ctx, NULL, NULL, NULL, nonce, 0)
            if ok == 1 and plain:
                ok = EVP_CipherUpdate(self._ctx, p, &outl, data + _HEADER, <int>plain)
            if ok == 1:
                ok = EVP_CIPHER_CTX_ctrl(self._ctx, EVP_CTRL_AEAD_SET_TAG, _TAG, tag)
            if ok == 1:
                ok = EVP_CipherFinal_ex(self._ctx, scratch, &final)
        if ok != 1:
            return None
        return out


from cpython.bytes cimport PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.ref cimport PyObject


def open_run(list batch, Py_ssize_t start, TransportCipher cipher, object replay,
             unsigned int receiver, object addr, object peer, dict cache, object lookup,
             list packets, uint64_t limit):
    """Open the run of transport messages in ``batch[start:]`` that belong to one
    session (``receiver``) and come from ``addr``; the twin of ``_pure.open_run``.

    For each: decrypt (a forgery is dropped), the replay check on ``replay`` (a
    ``ReplayFilter``; ``limit`` is REJECT_AFTER_MESSAGES), the IP header check, and
    cryptokey routing (the source must route to ``peer`` via ``cache`` or
    ``lookup``); accepted packets are appended to ``packets``.  Stops at the first
    datagram that is not part of the run.  Returns ``(next position, wire bytes
    authenticated, data packets authenticated)``.
    """
    cdef Py_ssize_t i = start
    cdef Py_ssize_t n = PyList_GET_SIZE(batch)
    cdef Py_ssize_t size, length, total
    cdef uint64_t counter, last, received = 0, data_count = 0
    cdef const unsigned char *p
    cdef const unsigned char *q
    cdef object item, data, plain, source, owner, ring
    cdef uint64_t word
    cdef unsigned int index
    cdef int version
    while i < n:
        item = <object>PyList_GET_ITEM(batch, i)
        if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
            break
        data = <object>PyTuple_GET_ITEM(item, 0)
        if type(data) is not bytes:
            break
        size = PyBytes_GET_SIZE(data)
        if size < 32:
            break
        p = <const unsigned char *>PyBytes_AS_STRING(data)
        if p[0] != 4 or p[1] != 0 or p[2] != 0 or p[3] != 0:
            break
        if (p[4] | (p[5] << 8) | (p[6] << 16) | (<unsigned int>p[7] << 24)) != receiver:
            break
        source = <object>PyTuple_GET_ITEM(item, 1)
        if source is not addr and source != addr:
            break
        i += 1
        counter = 0
        for index in range(8):
            counter |= (<uint64_t>p[8 + index]) << (8 * index)
        plain = cipher._open(counter, p, size)
        if plain is None:
            continue
        last = replay.last
        if counter > last and (counter >> 6) == (last >> 6) and counter < limit:
            replay.last = counter
            ring = replay.ring
            index = (counter >> 6) & 127
            word = ring[index]
            ring[index] = word | ((<uint64_t>1) << (counter & 63))
        elif not replay.validate(counter, limit):
            continue
        received += size
        length = PyBytes_GET_SIZE(plain)
        if length == 0:
            continue  # keepalive
        data_count += 1
        q = <const unsigned char *>PyBytes_AS_STRING(plain)
        version = q[0] >> 4
        if version == 4:
            if length < 20:
                continue
            total = (q[2] << 8) | q[3]
            if total > length or total < 20:
                continue
            source = plain[12:16]
        elif version == 6:
            if length < 40:
                continue
            total = ((q[4] << 8) | q[5]) + 40
            if total > length:
                continue
            source = plain[8:24]
        else:
            continue
        owner = cache.get(source)
        if owner is None:
            owner = lookup(source)
        if owner is not peer:
            continue
        packets.append(plain if total == length else plain[:total])
    return i, received, data_count


def seal_run(list packets, Py_ssize_t start, TransportCipher cipher, unsigned int receiver,
             uint64_t counter, uint64_t limit, Py_ssize_t mtu, Py_ssize_t max_size,
             object endpoint, object peer, dict cache, list out):
    """Seal the run of IP packets in ``packets[start:]`` whose destination routes (via
    ``cache``) to ``peer``, numbering them from ``counter`` while below ``limit``
    (REKEY_AFTER_MESSAGES); each message goes to ``out`` as ``(message, endpoint)``.
    Stops at the first packet that is not part of the run; the twin of
    ``_pure.seal_run``.  Returns ``(next position, next counter, wire bytes)``.
    """
    cdef Py_ssize_t i = start
    cdef Py_ssize_t n = PyList_GET_SIZE(packets)
    cdef Py_ssize_t size
    cdef uint64_t sent = 0
    cdef const unsigned char *p
    cdef object packet, destination, message
    cdef int version
    while i < n and counter < limit:
        packet = <object>PyList_GET_ITEM(packets, i)
        if type(packet) is not bytes:
            break
        size = PyBytes_GET_SIZE(packet)
        if size < 20 or size > max_size:
            break
        p = <const unsigned char *>PyBytes_AS_STRING(packet)
        version = p[0] >> 4
        if version == 4:
            destination = packet[16:20]
        elif version == 6 and size >= 40:
            destination = packet[24:40]
        else:
            break
        if cache.get(destination) is not peer:
            break
        message = cipher._seal(receiver, counter, p, size, mtu)
        counter += 1
        out.append((message, endpoint))
        sent += PyBytes_GET_SIZE(message)
        i += 1
    return i, counter, sent
