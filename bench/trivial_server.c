/* The fastest server we can put in front of the load generator, to measure the
 * generator's own ceiling: one epoll loop in C that echoes what it reads lower-cased
 * (the echo-lowercase line protocol, for lines that arrive in one segment) and closes on
 * EOF.  Listens on 127.0.0.1 on an ephemeral port and prints "READY <port>".
 * Bounded: it exits by itself after argv[1] seconds (default 120). */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>

int main(int argc, char **argv)
{
    int lifetime = argc > 1 ? atoi(argv[1]) : 120;
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    struct sockaddr_in sa;
    socklen_t len = sizeof sa;
    struct epoll_event ev, events[256];
    char buf[65536];
    time_t end = time(NULL) + lifetime;
    int ep, i, n, fd, c;

    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&sa, 0, sizeof sa);
    sa.sin_family = AF_INET;
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sa.sin_port = 0;
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4096)) {
        perror("listen");
        return 1;
    }
    getsockname(ls, (struct sockaddr *)&sa, &len);
    printf("READY %d\n", ntohs(sa.sin_port));
    fflush(stdout);
    ep = epoll_create1(0);
    ev.events = EPOLLIN;
    ev.data.fd = ls;
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    while (time(NULL) < end) {
        n = epoll_wait(ep, events, 256, 1000);
        for (i = 0; i < n; i++) {
            fd = events[i].data.fd;
            if (fd == ls) {
                while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    ev.events = EPOLLIN;
                    ev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev);
                }
                continue;
            }
            for (;;) {
                ssize_t r = read(fd, buf, sizeof buf), k;
                if (r > 0) {
                    for (k = 0; k < r; k++)
                        buf[k] = tolower((unsigned char)buf[k]);
                    if (write(fd, buf, r) < 0 && errno != EAGAIN)
                        r = 0;
                    else
                        continue;
                }
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
                    close(fd); /* also removes it from the epoll set */
                }
                break;
            }
        }
    }
    return 0;
}
