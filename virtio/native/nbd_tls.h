/* TLS for the native NBD data plane (nbd_tls.c): a GnuTLS client session on a
 * socket whose NBD_OPT_STARTTLS Python got acknowledged.  Handles are opaque
 * (void *): nbd_tls_client makes one, nbd_tls_free ends it; a data plane that
 * took one over (struct nbd_dp's tls) frees it itself. */
#ifndef PYVIRTIO_NBD_TLS_H
#define PYVIRTIO_NBD_TLS_H

void *nbd_tls_client(int fd, const char *cafile, const char *certfile, const char *keyfile,
                     const char *hostname, int verify, int timeout_ms, char *err,
                     size_t errlen);
long nbd_tls_send(void *h, const void *buf, size_t len, char *err, size_t errlen);
long nbd_tls_recv(void *h, void *buf, size_t len, char *err, size_t errlen);
void nbd_tls_free(void *h);
int nbd_tls_available(void);

#endif
