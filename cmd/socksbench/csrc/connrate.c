/* connrate: new TCP connections per second with one 1-byte exchange each,
 * from a libc client so that proxychains4 (an LD_PRELOAD connect hook) can
 * carry it too. Usage: connrate HOST PORT SECONDS THREADS. Prints the total
 * count of completed connections. Built by socksbench at bench time. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in target;
static double seconds;
static long counts[64];

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *worker(void *arg) {
	long id = (long)arg;
	double end = now() + seconds;
	char b = 'x';
	while (now() < end) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0) continue;
		if (connect(fd, (struct sockaddr *)&target, sizeof target) == 0 &&
		    write(fd, &b, 1) == 1 && read(fd, &b, 1) == 1)
			counts[id]++;
		close(fd);
	}
	return NULL;
}

int main(int argc, char **argv) {
	if (argc != 5) {
		fprintf(stderr, "usage: connrate HOST PORT SECONDS THREADS\n");
		return 2;
	}
	target.sin_family = AF_INET;
	target.sin_port = htons(atoi(argv[2]));
	inet_pton(AF_INET, argv[1], &target.sin_addr);
	seconds = atof(argv[3]);
	int n = atoi(argv[4]);
	if (n < 1 || n > 64) n = 1;
	pthread_t th[64];
	for (long i = 0; i < n; i++) pthread_create(&th[i], NULL, worker, (void *)i);
	long total = 0;
	for (int i = 0; i < n; i++) {
		pthread_join(th[i], NULL);
		total += counts[i];
	}
	printf("%ld\n", total);
	return 0;
}
