/* connrate: new TCP connections per second with one 1-byte exchange each,
 * from a libc client so that proxychains4 (an LD_PRELOAD connect hook) can
 * carry it too. Usage: connrate HOST PORT SECONDS THREADS [TARGET]. With
 * TARGET (host:port), HOST:PORT is an HTTP proxy: each connection first
 * sends CONNECT TARGET and must get 200. Prints the count of completed
 * connections, then of failed ones. Built by socksbench at bench time. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in target;
static double seconds;
static long counts[64], failures[64];
static char connect_req[600]; /* the CONNECT request, when TARGET is given */
static int connect_len;

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* http_connect sends the CONNECT request on fd and reads the proxy's
 * answer head (nothing follows it until we write): 1 when it is a 200. */
static int http_connect(int fd) {
	char buf[1024];
	int n = 0;
	if (write(fd, connect_req, connect_len) != connect_len) return 0;
	while (n < (int)sizeof buf - 1) {
		ssize_t r = read(fd, buf + n, sizeof buf - 1 - n);
		if (r <= 0) return 0;
		n += r;
		buf[n] = 0;
		if (strstr(buf, "\r\n\r\n")) return n > 12 && memcmp(buf + 8, " 200", 4) == 0;
	}
	return 0;
}

static void *worker(void *arg) {
	long id = (long)arg;
	double end = now() + seconds;
	char b = 'x';
	while (now() < end) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0) {
			failures[id]++;
			continue;
		}
		if (connect(fd, (struct sockaddr *)&target, sizeof target) == 0 &&
		    (connect_len == 0 || http_connect(fd)) &&
		    write(fd, &b, 1) == 1 && read(fd, &b, 1) == 1)
			counts[id]++;
		else
			failures[id]++;
		close(fd);
	}
	return NULL;
}

int main(int argc, char **argv) {
	if (argc != 5 && argc != 6) {
		fprintf(stderr, "usage: connrate HOST PORT SECONDS THREADS [TARGET]\n");
		return 2;
	}
	if (argc == 6)
		connect_len = snprintf(connect_req, sizeof connect_req, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", argv[5], argv[5]);
	target.sin_family = AF_INET;
	target.sin_port = htons(atoi(argv[2]));
	inet_pton(AF_INET, argv[1], &target.sin_addr);
	seconds = atof(argv[3]);
	int n = atoi(argv[4]);
	if (n < 1 || n > 64) n = 1;
	pthread_t th[64];
	for (long i = 0; i < n; i++) pthread_create(&th[i], NULL, worker, (void *)i);
	long total = 0, failed = 0;
	for (int i = 0; i < n; i++) {
		pthread_join(th[i], NULL);
		total += counts[i];
		failed += failures[i];
	}
	printf("%ld %ld\n", total, failed);
	return 0;
}
