// SPDX-License-Identifier: BSD-3-Clause
//
// rpma-write-lat: librpma 1.2's write + flush latency, the peer `scripts/bench-data.sh`
// prints beside pmgas's durable write (#11 item 9). Debian's fio has no librpma engine,
// so this is the small peer of our own the issue asks for; it follows librpma's example
// 05-flush-to-persistent (the same calls), timed in a loop.
//
//   rpma-write-lat server <addr> <port>
//       registers 64 KiB (WRITE_DST, FLUSH_TYPE_VISIBILITY: the only flush type a
//       DRAM/tmpfs region has) and serves one connection after another until killed;
//       prints "RPMA SERVER READY" once listening.
//   rpma-write-lat client <addr> <port> <size> <iters> <warmup>
//       per iteration: rpma_write of <size> bytes, then rpma_flush of the same range,
//       and waits (busy-polling the CQ, as perftest does) for the flush's completion.
//       Prints one line:
//       RPMA op=write_flush size_bytes=N flush=visibility iters=N p50_ns=N p99_ns=N
//
// What the flush means here: librpma picks RPMA_FLUSH_TYPE_VISIBILITY when the server
// does not declare direct write to PMem. It is a READ after the WRITE (librpma's APM):
// the bytes reached the responder's memory system, which on rxe (the responder's CPU
// copies them) or with DDIO on is NOT durability — it is printed for reference only.
// Percentiles are exact (sorted samples), not a histogram's.

#include <errno.h>
#include <inttypes.h>
#include <librpma.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REGION_BYTES (64 << 10)
#define FLUSH_ID ((void *)0xF01D)

struct descriptor {
	uint8_t mr_desc_size;
	uint8_t pcfg_desc_size;
	uint8_t descriptors[128]; /* an RC accept carries at most 196 bytes of private data */
};

static void *aligned_zeroed(size_t size)
{
	void *p = NULL;
	if (posix_memalign(&p, 4096, size) != 0)
		return NULL;
	memset(p, 0, size);
	return p;
}

static int die(const char *what, int ret)
{
	fprintf(stderr, "rpma-write-lat: %s failed: %s\n", what, rpma_err_2str(ret));
	return 1;
}

static int wait_event(struct rpma_conn *conn, enum rpma_conn_event want)
{
	enum rpma_conn_event ev = RPMA_CONN_UNDEFINED;
	int ret = rpma_conn_next_event(conn, &ev);
	if (ret)
		return ret;
	if (ev != want) {
		fprintf(stderr, "rpma-write-lat: connection event %s, expected %s\n",
			rpma_utils_conn_event_2str(ev), rpma_utils_conn_event_2str(want));
		return -1;
	}
	return 0;
}

static int server(const char *addr, const char *port)
{
	struct ibv_context *ctx = NULL;
	struct rpma_peer *peer = NULL;
	struct rpma_peer_cfg *pcfg = NULL;
	struct rpma_ep *ep = NULL;
	struct rpma_mr_local *mr = NULL;
	void *mem = aligned_zeroed(REGION_BYTES);
	int ret;

	if (mem == NULL)
		return die("posix_memalign", RPMA_E_NOMEM);
	if ((ret = rpma_peer_cfg_new(&pcfg)))
		return die("rpma_peer_cfg_new", ret);
	if ((ret = rpma_utils_get_ibv_context(addr, RPMA_UTIL_IBV_CONTEXT_LOCAL, &ctx)))
		return die("rpma_utils_get_ibv_context", ret);
	if ((ret = rpma_peer_new(ctx, &peer)))
		return die("rpma_peer_new", ret);
	if ((ret = rpma_ep_listen(peer, addr, port, &ep)))
		return die("rpma_ep_listen", ret);
	if ((ret = rpma_mr_reg(peer, mem, REGION_BYTES,
			RPMA_MR_USAGE_WRITE_DST | RPMA_MR_USAGE_FLUSH_TYPE_VISIBILITY, &mr)))
		return die("rpma_mr_reg", ret);

	struct descriptor d = {0};
	size_t mr_size = 0, pcfg_size = 0;
	if ((ret = rpma_mr_get_descriptor_size(mr, &mr_size)) ||
	    (ret = rpma_peer_cfg_get_descriptor_size(pcfg, &pcfg_size)))
		return die("descriptor size", ret);
	if (mr_size + pcfg_size > sizeof(d.descriptors))
		return die("descriptor size", RPMA_E_INVAL);
	d.mr_desc_size = (uint8_t)mr_size;
	d.pcfg_desc_size = (uint8_t)pcfg_size;
	if ((ret = rpma_mr_get_descriptor(mr, &d.descriptors[0])) ||
	    (ret = rpma_peer_cfg_get_descriptor(pcfg, &d.descriptors[mr_size])))
		return die("descriptor", ret);

	printf("RPMA SERVER READY %s:%s\n", addr, port);
	fflush(stdout);
	for (;;) {
		struct rpma_conn_req *req = NULL;
		struct rpma_conn *conn = NULL;
		struct rpma_conn_private_data pdata = {.ptr = &d, .len = sizeof(d)};
		if ((ret = rpma_ep_next_conn_req(ep, NULL, &req)))
			return die("rpma_ep_next_conn_req", ret);
		if ((ret = rpma_conn_req_connect(&req, &pdata, &conn)))
			return die("rpma_conn_req_connect", ret);
		if ((ret = wait_event(conn, RPMA_CONN_ESTABLISHED)))
			return die("establishing a connection", ret);
		/* The client writes and flushes one-sided; we only wait for it to leave. */
		(void) wait_event(conn, RPMA_CONN_CLOSED);
		(void) rpma_conn_disconnect(conn);
		(void) rpma_conn_delete(&conn);
	}
}

static uint64_t now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

static int client(const char *addr, const char *port, size_t size, long iters, long warmup)
{
	struct ibv_context *ctx = NULL;
	struct rpma_peer *peer = NULL;
	struct rpma_conn_req *req = NULL;
	struct rpma_conn *conn = NULL;
	struct rpma_mr_local *src = NULL;
	struct rpma_mr_remote *dst = NULL;
	struct rpma_peer_cfg *pcfg = NULL;
	struct rpma_cq *cq = NULL;
	void *mem = aligned_zeroed(REGION_BYTES);
	uint64_t *samples = calloc((size_t)iters, sizeof(uint64_t));
	int ret;

	if (mem == NULL || samples == NULL)
		return die("allocation", RPMA_E_NOMEM);
	if (size == 0 || size > REGION_BYTES || iters <= 0 || warmup < 0)
		return die("arguments", RPMA_E_INVAL);
	if ((ret = rpma_utils_get_ibv_context(addr, RPMA_UTIL_IBV_CONTEXT_REMOTE, &ctx)))
		return die("rpma_utils_get_ibv_context", ret);
	if ((ret = rpma_peer_new(ctx, &peer)))
		return die("rpma_peer_new", ret);
	if ((ret = rpma_conn_req_new(peer, addr, port, NULL, &req)))
		return die("rpma_conn_req_new", ret);
	if ((ret = rpma_conn_req_connect(&req, NULL, &conn)))
		return die("rpma_conn_req_connect", ret);
	if ((ret = wait_event(conn, RPMA_CONN_ESTABLISHED)))
		return die("connecting", ret);
	if ((ret = rpma_mr_reg(peer, mem, REGION_BYTES, RPMA_MR_USAGE_WRITE_SRC, &src)))
		return die("rpma_mr_reg", ret);

	struct rpma_conn_private_data pdata;
	if ((ret = rpma_conn_get_private_data(conn, &pdata)) || pdata.len < 2)
		return die("rpma_conn_get_private_data", ret ? ret : RPMA_E_INVAL);
	const struct descriptor *d = pdata.ptr;
	if ((size_t)d->mr_desc_size + d->pcfg_desc_size + 2 > pdata.len)
		return die("the server's descriptors (truncated)", RPMA_E_INVAL);
	if ((ret = rpma_peer_cfg_from_descriptor(&d->descriptors[d->mr_desc_size],
			d->pcfg_desc_size, &pcfg)) ||
	    (ret = rpma_conn_apply_remote_peer_cfg(conn, pcfg)))
		return die("the server's peer configuration", ret);
	(void) rpma_peer_cfg_delete(&pcfg);
	if ((ret = rpma_mr_remote_from_descriptor(&d->descriptors[0], d->mr_desc_size, &dst)))
		return die("rpma_mr_remote_from_descriptor", ret);
	if ((ret = rpma_conn_get_cq(conn, &cq)))
		return die("rpma_conn_get_cq", ret);

	memset(mem, 0xab, size);
	for (long i = -warmup; i < iters; i++) {
		uint64_t t0 = now_ns();
		if ((ret = rpma_write(conn, dst, 0, src, 0, size, RPMA_F_COMPLETION_ON_ERROR, NULL)))
			return die("rpma_write", ret);
		if ((ret = rpma_flush(conn, dst, 0, size, RPMA_FLUSH_TYPE_VISIBILITY,
				RPMA_F_COMPLETION_ALWAYS, FLUSH_ID)))
			return die("rpma_flush", ret);
		struct ibv_wc wc;
		do {
			ret = rpma_cq_get_wc(cq, 1, &wc, NULL);
		} while (ret == RPMA_E_NO_COMPLETION);
		if (ret)
			return die("rpma_cq_get_wc", ret);
		if (wc.status != IBV_WC_SUCCESS || wc.wr_id != (uintptr_t)FLUSH_ID) {
			fprintf(stderr, "rpma-write-lat: completion %s (wr_id %" PRIx64 ")\n",
				ibv_wc_status_str(wc.status), (uint64_t)wc.wr_id);
			return 1;
		}
		if (i >= 0)
			samples[i] = now_ns() - t0;
	}
	qsort(samples, (size_t)iters, sizeof(uint64_t), cmp_u64);
	printf("RPMA op=write_flush size_bytes=%zu flush=visibility iters=%ld p50_ns=%" PRIu64
	       " p99_ns=%" PRIu64 "\n",
	       size, iters, samples[(iters - 1) / 2], samples[(iters * 99 - 1) / 100]);
	(void) rpma_mr_remote_delete(&dst);
	(void) rpma_mr_dereg(&src);
	(void) rpma_conn_disconnect(conn);
	(void) wait_event(conn, RPMA_CONN_CLOSED);
	(void) rpma_conn_delete(&conn);
	(void) rpma_peer_delete(&peer);
	free(samples);
	free(mem);
	return 0;
}

int main(int argc, char *argv[])
{
	/* RPMA_WRITE_LAT_DEBUG=1: librpma's own log on stderr. */
	if (getenv("RPMA_WRITE_LAT_DEBUG")) {
		rpma_log_set_threshold(RPMA_LOG_THRESHOLD, RPMA_LOG_LEVEL_DEBUG);
		rpma_log_set_threshold(RPMA_LOG_THRESHOLD_AUX, RPMA_LOG_LEVEL_DEBUG);
	}
	if (argc == 4 && strcmp(argv[1], "server") == 0)
		return server(argv[2], argv[3]);
	if (argc == 7 && strcmp(argv[1], "client") == 0)
		return client(argv[2], argv[3], strtoul(argv[4], NULL, 10), strtol(argv[5], NULL, 10),
			strtol(argv[6], NULL, 10));
	fprintf(stderr, "usage: %s server <addr> <port>\n"
			"       %s client <addr> <port> <size> <iters> <warmup>\n",
		argv[0], argv[0]);
	return 2;
}
