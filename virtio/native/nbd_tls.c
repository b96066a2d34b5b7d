/* TLS for the native NBD data plane with GnuTLS (Debian libgnutls28-dev): the
 * X.509 client side of NBD_OPT_STARTTLS (NBD doc/proto.md "TLS support").
 *
 * Python does the plain part of the handshake (greeting, NBD_OPT_STARTTLS and its
 * ack), then nbd_tls_client does the TLS handshake on the blocking socket with the
 * checks nbd_tls.py's Python client makes: the server's chain against cafile (or
 * the system's CAs), its name (hostname: DNS name or IP address) when given, our
 * certificate when certfile/keyfile are given, TLS 1.2 at least; verify=0 skips
 * the server's checks.  Python finishes the option haggling (OPT_GO ...) through
 * nbd_tls_send / nbd_tls_recv, then the data plane (nbd_dataplane.c) sends and
 * receives its records on the then non-blocking socket.  Errors come back as the
 * GnuTLS error string in err (a certificate that did not verify: why). */
#include <arpa/inet.h>
#include <poll.h>

#include "nbd_tls.h"

#ifdef HAVE_GNUTLS
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

struct nbd_tls {
    gnutls_session_t session;
    gnutls_certificate_credentials_t cred;
    int fd;
    int timeout_ms;             /* the blocking calls' (handshake, send/recv) */
};

#define NBD_TLS_PRIORITY "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"

static void nbd_tls_err(char *err, size_t errlen, const char *what, int rc)
{
    if (err && errlen)
        snprintf(err, errlen, "%s: %s", what, gnutls_strerror(rc));
}

int nbd_tls_available(void)
{
    return 1;
}

void nbd_tls_free(void *h)
{
    struct nbd_tls *t = h;
    if (!t)
        return;
    if (t->session)
        gnutls_deinit(t->session);
    if (t->cred)
        gnutls_certificate_free_credentials(t->cred);
    free(t);
}

/* Why the server's certificate did not verify, as GnuTLS words it. */
static void nbd_tls_verify_err(struct nbd_tls *t, char *err, size_t errlen)
{
    unsigned status = gnutls_session_get_verify_cert_status(t->session);
    gnutls_datum_t out = {0};
    if (gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &out, 0) == 0) {
        snprintf(err, errlen, "certificate did not verify: %s", (const char *)out.data);
        gnutls_free(out.data);
    } else {
        snprintf(err, errlen, "certificate did not verify (status %#x)", status);
    }
}

void *nbd_tls_client(int fd, const char *cafile, const char *certfile, const char *keyfile,
                     const char *hostname, int verify, int timeout_ms, char *err,
                     size_t errlen)
{
    struct nbd_tls *t = calloc(1, sizeof *t);
    if (!t) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    t->fd = fd;
    t->timeout_ms = timeout_ms;
    int rc = gnutls_certificate_allocate_credentials(&t->cred);
    if (rc < 0) {
        nbd_tls_err(err, errlen, "credentials", rc);
        goto fail;
    }
    if (cafile && *cafile) {
        rc = gnutls_certificate_set_x509_trust_file(t->cred, cafile, GNUTLS_X509_FMT_PEM);
        if (rc <= 0) {
            nbd_tls_err(err, errlen, cafile, rc ? rc : GNUTLS_E_NO_CERTIFICATE_FOUND);
            goto fail;
        }
    } else if (verify) {
        rc = gnutls_certificate_set_x509_system_trust(t->cred);
        if (rc < 0) {
            nbd_tls_err(err, errlen, "the system's CAs", rc);
            goto fail;
        }
    }
    if (certfile && *certfile) {
        rc = gnutls_certificate_set_x509_key_file(t->cred, certfile, keyfile,
                                                  GNUTLS_X509_FMT_PEM);
        if (rc < 0) {
            nbd_tls_err(err, errlen, certfile, rc);
            goto fail;
        }
    }
    rc = gnutls_init(&t->session, GNUTLS_CLIENT);
    if (rc < 0) {
        t->session = NULL;
        nbd_tls_err(err, errlen, "session", rc);
        goto fail;
    }
    const char *where = NULL;
    rc = gnutls_priority_set_direct(t->session, NBD_TLS_PRIORITY, &where);
    if (rc >= 0)
        rc = gnutls_credentials_set(t->session, GNUTLS_CRD_CERTIFICATE, t->cred);
    if (rc < 0) {
        nbd_tls_err(err, errlen, "session", rc);
        goto fail;
    }
    if (hostname && *hostname) {
        unsigned char addr[16];
        int ip = inet_pton(AF_INET, hostname, addr) == 1 || inet_pton(AF_INET6, hostname, addr) == 1;
        if (!ip) /* SNI carries DNS names only (RFC 6066 §3) */
            gnutls_server_name_set(t->session, GNUTLS_NAME_DNS, hostname, strlen(hostname));
    }
    if (verify)
        gnutls_session_set_verify_cert(t->session, hostname && *hostname ? hostname : NULL, 0);
    gnutls_transport_set_int(t->session, fd);
    do {
        rc = gnutls_handshake(t->session);
    } while (rc < 0 && !gnutls_error_is_fatal(rc) && rc != GNUTLS_E_AGAIN);
    if (rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
        nbd_tls_verify_err(t, err, errlen);
        goto fail;
    }
    if (rc == GNUTLS_E_AGAIN) {
        snprintf(err, errlen, "TLS handshake timed out");
        goto fail;
    }
    if (rc < 0) {
        nbd_tls_err(err, errlen, "TLS handshake failed", rc);
        goto fail;
    }
    return t;
fail:
    nbd_tls_free(t);
    return NULL;
}

/* GNUTLS_E_AGAIN on the blocking socket: the socket's SO_RCVTIMEO/SO_SNDTIMEO ran
 * out, or GnuTLS handled a record without data (an OpenSSL server's TLS 1.3
 * session tickets after the handshake).  1: go on (the socket is ready within the
 * timeout), 0: timed out. */
static int nbd_tls_ready(struct nbd_tls *t)
{
    struct pollfd p = {t->fd, gnutls_record_get_direction(t->session) ? POLLOUT : POLLIN, 0};
    int r;
    do {
        r = poll(&p, 1, t->timeout_ms);
    } while (r < 0 && errno == EINTR);
    return r > 0;
}

/* Blocking record I/O for Python's option haggling: bytes moved, or -1 (err set). */
long nbd_tls_send(void *h, const void *buf, size_t len, char *err, size_t errlen)
{
    struct nbd_tls *t = h;
    ssize_t n;
    do {
        n = gnutls_record_send(t->session, buf, len);
    } while (n == GNUTLS_E_INTERRUPTED || (n == GNUTLS_E_AGAIN && nbd_tls_ready(t)));
    if (n == GNUTLS_E_AGAIN) {
        snprintf(err, errlen, "TLS send timed out");
        return -1;
    }
    if (n < 0) {
        nbd_tls_err(err, errlen, "TLS send", (int)n);
        return -1;
    }
    return (long)n;
}

long nbd_tls_recv(void *h, void *buf, size_t len, char *err, size_t errlen)
{
    struct nbd_tls *t = h;
    ssize_t n;
    do {
        n = gnutls_record_recv(t->session, buf, len);
    } while (n == GNUTLS_E_INTERRUPTED || n == GNUTLS_E_REHANDSHAKE ||
             (n == GNUTLS_E_AGAIN && nbd_tls_ready(t)));
    if (n == GNUTLS_E_AGAIN) {
        snprintf(err, errlen, "TLS receive timed out");
        return -1;
    }
    if (n == GNUTLS_E_PREMATURE_TERMINATION)
        return 0; /* the server hung up without close_notify: end of file all the same */
    if (n < 0) {
        nbd_tls_err(err, errlen, "TLS receive", (int)n);
        return -1;
    }
    return (long)n;
}

/* For the data plane (non-blocking socket): bytes moved, -EAGAIN (call again with
 * the same arguments), 0 (recv: end of file), or another -errno. */
static ssize_t nbd_tls_io_send(void *h, const void *buf, size_t len)
{
    struct nbd_tls *t = h;
    ssize_t n = gnutls_record_send(t->session, buf, len);
    if (n >= 0)
        return n;
    if (n == GNUTLS_E_AGAIN)
        return -EAGAIN;
    if (n == GNUTLS_E_INTERRUPTED)
        return -EINTR;
    return -EPIPE;
}

static ssize_t nbd_tls_io_recv(void *h, void *buf, size_t len)
{
    struct nbd_tls *t = h;
    ssize_t n = gnutls_record_recv(t->session, buf, len);
    if (n >= 0)
        return n;
    if (n == GNUTLS_E_AGAIN || n == GNUTLS_E_REHANDSHAKE)
        return -EAGAIN; /* (TLS 1.2 renegotiation is not done: the server goes on) */
    if (n == GNUTLS_E_INTERRUPTED)
        return -EINTR;
    if (n == GNUTLS_E_PREMATURE_TERMINATION)
        return 0;
    return -EPROTO;
}

/* close_notify, not waiting for the server's (best effort, non-blocking). */
static void nbd_tls_bye(void *h)
{
    gnutls_bye(((struct nbd_tls *)h)->session, GNUTLS_SHUT_WR);
}

#else /* without GnuTLS: nbds:// stays on the Python path */

int nbd_tls_available(void)
{
    return 0;
}

void *nbd_tls_client(int fd, const char *cafile, const char *certfile, const char *keyfile,
                     const char *hostname, int verify, int timeout_ms, char *err,
                     size_t errlen)
{
    snprintf(err, errlen, "built without GnuTLS (libgnutls28-dev)");
    return NULL;
}

long nbd_tls_send(void *h, const void *buf, size_t len, char *err, size_t errlen)
{
    return -1;
}

long nbd_tls_recv(void *h, void *buf, size_t len, char *err, size_t errlen)
{
    return -1;
}

void nbd_tls_free(void *h)
{
}

static ssize_t nbd_tls_io_send(void *h, const void *buf, size_t len)
{
    return -EPIPE;
}

static ssize_t nbd_tls_io_recv(void *h, void *buf, size_t len)
{
    return -EPROTO;
}

static void nbd_tls_bye(void *h)
{
}
#endif
