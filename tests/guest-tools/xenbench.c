/*
 * xenbench: guest-side latency of two Xen paths, run inside a pyvmm Xen HVM guest.
 *
 *   xenbench hypercall N   N x xen_version(XENVER_version, NULL) through
 *                          /dev/xen/privcmd (IOCTL_PRIVCMD_HYPERCALL); KVM
 *                          answers it itself when the VMM set the version
 *   xenbench features N    N x xen_version(XENVER_get_features, &info), the
 *                          same way; KVM always passes this one to the VMM
 *   xenbench xenstore N    N x XS_READ "domid" through /dev/xen/xenbus
 *   xenbench read KEY      print KEY's value (one XS_READ; relative keys are
 *                          under the guest's /local/domain/<domid>)
 *   xenbench write KEY VALUE   set KEY (one XS_WRITE)
 *
 * Each mode prints one line for the host to parse:
 *   xenbench: hypercall median_ns=... mean_ns=... min_ns=... n=... batches=... result=0x40011
 *   xenbench: xenstore median_us=... mean_us=... min_us=... p90_us=... max_us=... n=... result=1
 *
 * Built statically on the host (gcc -O2 -static) and placed in the guest's
 * initramfs; it needs only the kernel's Xen devices, no Xen libraries.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* include/uapi/xen/privcmd.h */
struct privcmd_hypercall {
	uint64_t op;
	uint64_t arg[5];
};
#define IOCTL_PRIVCMD_HYPERCALL _IOC(_IOC_NONE, 'P', 0, sizeof(struct privcmd_hypercall))

/* xen/include/public/xen.h, version.h, io/xs_wire.h */
#define HYPERVISOR_xen_version 17
#define XENVER_version 0
#define XENVER_get_features 6
#define XS_READ 2
#define XS_WRITE 11
#define XS_ERROR 16

struct xen_feature_info {
	uint32_t submap_idx;
	uint32_t submap;
};

struct xsd_sockmsg {
	uint32_t type;
	uint32_t req_id;
	uint32_t tx_id;
	uint32_t len;
};

#define HYPERCALL_BATCHES 10
#define WARMUP 16
#define XS_BODY_MAX 4096 /* XENSTORE_PAYLOAD_MAX */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static double mean_of(const double *v, size_t n)
{
	double sum = 0;
	for (size_t i = 0; i < n; i++)
		sum += v[i];
	return sum / (double)n;
}

/* v is sorted */
static double median_of(const double *v, size_t n)
{
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static int open_dev(const char *const *paths, const char **used)
{
	for (; *paths; paths++) {
		int fd = open(*paths, O_RDWR | O_CLOEXEC);
		if (fd >= 0) {
			*used = *paths;
			return fd;
		}
		fprintf(stderr, "xenbench: open %s: %s\n", *paths, strerror(errno));
	}
	return -1;
}

/* `features`: XENVER_get_features instead of XENVER_version, so that the
 * call always leaves the kernel for the VMM's own hypercall handler. */
static int bench_hypercall(long n, int features)
{
	static const char *const paths[] = {"/dev/xen/privcmd", "/proc/xen/privcmd", NULL};
	const char *path;
	int fd = open_dev(paths, &path);
	if (fd < 0)
		return 1;

	static struct xen_feature_info info;
	struct privcmd_hypercall call = {.op = HYPERVISOR_xen_version, .arg = {XENVER_version, 0}};
	if (features) {
		call.arg[0] = XENVER_get_features;
		call.arg[1] = (uint64_t)(uintptr_t)&info;
	}
	long result = 0;
	for (int i = 0; i < WARMUP; i++) {
		result = ioctl(fd, IOCTL_PRIVCMD_HYPERCALL, &call);
		if (result < 0) {
			fprintf(stderr, "xenbench: IOCTL_PRIVCMD_HYPERCALL on %s: %s\n", path, strerror(errno));
			return 1;
		}
	}

	/* The clock is read once per batch, so its own cost (a syscall when the
	 * vDSO cannot use the Xen clocksource) is spread over the batch. */
	int batches = n >= HYPERCALL_BATCHES ? HYPERCALL_BATCHES : 1;
	long per_batch = n / batches;
	double per_call[HYPERCALL_BATCHES];
	for (int b = 0; b < batches; b++) {
		uint64_t start = now_ns();
		for (long i = 0; i < per_batch; i++) {
			long r = ioctl(fd, IOCTL_PRIVCMD_HYPERCALL, &call);
			if (r != result) {
				fprintf(stderr, "xenbench: hypercall returned %ld (errno %d), first %ld\n", r, errno, result);
				return 1;
			}
		}
		per_call[b] = (double)(now_ns() - start) / (double)per_batch;
	}
	double mean = mean_of(per_call, batches);
	qsort(per_call, batches, sizeof per_call[0], cmp_double);
	printf("xenbench: %s median_ns=%.0f mean_ns=%.0f min_ns=%.0f n=%ld batches=%d result=%#lx",
	       features ? "features" : "hypercall", median_of(per_call, batches), mean, per_call[0],
	       per_batch * batches, batches, result);
	if (features)
		printf(" submap=%#x", info.submap);
	printf("\n");
	close(fd);
	return 0;
}

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;
	while (len) {
		ssize_t w = write(fd, p, len);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += w;
		len -= (size_t)w;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
	char *p = buf;
	while (len) {
		ssize_t r = read(fd, p, len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -1;
		p += r;
		len -= (size_t)r;
	}
	return 0;
}

/* One request of `type` with `body` (bodylen bytes); the reply's payload,
 * NUL-terminated, goes to value[cap]. */
static int xs_request(int fd, uint32_t type, uint32_t req_id, const char *body, size_t bodylen, char *value,
		      size_t cap)
{
	struct {
		struct xsd_sockmsg hdr;
		char body[XS_BODY_MAX];
	} msg;
	if (bodylen > sizeof msg.body) {
		fprintf(stderr, "xenbench: request of %zu bytes is too long\n", bodylen);
		return -1;
	}
	msg.hdr = (struct xsd_sockmsg){.type = type, .req_id = req_id, .tx_id = 0, .len = (uint32_t)bodylen};
	memcpy(msg.body, body, bodylen);
	if (write_all(fd, &msg, sizeof msg.hdr + bodylen) < 0) {
		fprintf(stderr, "xenbench: write to xenbus: %s\n", strerror(errno));
		return -1;
	}
	struct xsd_sockmsg reply;
	if (read_all(fd, &reply, sizeof reply) < 0) {
		fprintf(stderr, "xenbench: read from xenbus: %s\n", errno ? strerror(errno) : "end of file");
		return -1;
	}
	if (reply.len >= cap) {
		fprintf(stderr, "xenbench: reply of %u bytes is too long\n", reply.len);
		return -1;
	}
	if (read_all(fd, value, reply.len) < 0) {
		fprintf(stderr, "xenbench: read from xenbus: %s\n", errno ? strerror(errno) : "end of file");
		return -1;
	}
	value[reply.len] = 0;
	if (reply.type == XS_ERROR || reply.type != type || reply.req_id != req_id) {
		fprintf(stderr, "xenbench: request type %u for %s: reply type %u req_id %u (sent %u): %s\n", type,
			body, reply.type, reply.req_id, req_id, value);
		return -1;
	}
	return 0;
}

/* One XS_READ of `key`; the value (NUL-terminated) goes to value[cap]. */
static int xs_read(int fd, uint32_t req_id, const char *key, char *value, size_t cap)
{
	return xs_request(fd, XS_READ, req_id, key, strlen(key) + 1, value, cap);
}

static int open_xenbus(void)
{
	static const char *const paths[] = {"/dev/xen/xenbus", "/proc/xen/xenbus", NULL};
	const char *path;
	return open_dev(paths, &path);
}

/* `read KEY`: print KEY's value; `write KEY VALUE`: set it. */
static int xs_tool(const char *command, const char *key, const char *data)
{
	char body[XS_BODY_MAX], value[XS_BODY_MAX];
	size_t keylen = strlen(key) + 1, datalen = data ? strlen(data) : 0;
	if (keylen + datalen > sizeof body) {
		fprintf(stderr, "xenbench: %s: key and value are too long\n", command);
		return 2;
	}
	int fd = open_xenbus();
	if (fd < 0)
		return 1;
	memcpy(body, key, keylen);
	if (data)
		memcpy(body + keylen, data, datalen);
	if (xs_request(fd, data ? XS_WRITE : XS_READ, 1, body, keylen + datalen, value, sizeof value) < 0)
		return 1;
	if (!data)
		printf("%s\n", value);
	close(fd);
	return 0;
}

static int bench_xenstore(long n)
{
	int fd = open_xenbus();
	if (fd < 0)
		return 1;

	char value[256];
	uint32_t req_id = 1;
	for (int i = 0; i < WARMUP; i++)
		if (xs_read(fd, req_id++, "domid", value, sizeof value) < 0)
			return 1;

	double *us = malloc(sizeof *us * (size_t)n);
	if (!us) {
		perror("xenbench: malloc");
		return 1;
	}
	for (long i = 0; i < n; i++) {
		uint64_t start = now_ns();
		if (xs_read(fd, req_id++, "domid", value, sizeof value) < 0)
			return 1;
		us[i] = (double)(now_ns() - start) / 1000.0;
	}
	double mean = mean_of(us, n);
	qsort(us, n, sizeof us[0], cmp_double);
	printf("xenbench: xenstore median_us=%.1f mean_us=%.1f min_us=%.1f p90_us=%.1f max_us=%.1f n=%ld result=%s\n",
	       median_of(us, n), mean, us[0], us[(size_t)(n * 9 / 10)], us[n - 1], n, value);
	free(us);
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	static const char usage[] = "usage: %s hypercall|features|xenstore N | read KEY | write KEY VALUE\n";
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc == 3 && !strcmp(argv[1], "read"))
		return xs_tool(argv[1], argv[2], NULL);
	if (argc == 4 && !strcmp(argv[1], "write"))
		return xs_tool(argv[1], argv[2], argv[3]);
	if (argc != 3) {
		fprintf(stderr, usage, argv[0]);
		return 2;
	}
	char *end;
	long n = strtol(argv[2], &end, 10);
	if (*end || n < 1 || n > 100000000) {
		fprintf(stderr, "xenbench: N must be an integer from 1 to 100000000\n");
		return 2;
	}
	if (!strcmp(argv[1], "hypercall"))
		return bench_hypercall(n, 0);
	if (!strcmp(argv[1], "features"))
		return bench_hypercall(n, 1);
	if (!strcmp(argv[1], "xenstore"))
		return bench_xenstore(n);
	fprintf(stderr, usage, argv[0]);
	return 2;
}
