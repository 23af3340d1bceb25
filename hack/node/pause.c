/* The pause process of the test node's pod sandboxes (containerd's sandbox image).
 * It holds the pod's namespaces open, reaps the zombies it inherits as PID 1 of a pod that shares
 * its process namespace, and exits on SIGTERM or SIGINT. Built with `gcc -static` by
 * hack/k8s-tools.sh, so its image needs no libc. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction quit = {.sa_handler = stop}, child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
  sigaction(SIGTERM, &quit, NULL);
  sigaction(SIGINT, &quit, NULL);
  sigaction(SIGCHLD, &child, NULL);
  for (;;) pause();
}
