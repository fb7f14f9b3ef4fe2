/* Every descriptor libportcullis holds is close-on-exec: connects, maps memory, enables the
 * ring, then checks each descriptor that appeared meanwhile (FD_CLOEXEC), and that a child it
 * execs inherits none of them. (Descriptors the process inherited itself are not the library's.)
 * Prints "descriptors checked: N", "inheritable: K", "child sees: M". Usage: cloexec RUN_DIR|- */
#define _POSIX_C_SOURCE 200809L

#include <portcullis.h>

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_FD 1024

/* Marks the descriptors open now (but for the directory stream's own). */
static void open_now(char *open) {
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *entry;
    memset(open, 0, MAX_FD);
    if (dir == NULL) exit(1);
    while ((entry = readdir(dir)) != NULL) {
        int fd = atoi(entry->d_name);
        if (entry->d_name[0] != '.' && fd >= 0 && fd < MAX_FD && fd != dirfd(dir)) open[fd] = 1;
    }
    closedir(dir);
}

static void check(int rc, const char *what, pc_conn *conn) {
    if (rc != PC_SUCCESS) {
        fprintf(stderr, "%s: %s (%s)\n", what, pc_status_name(rc), conn ? pc_last_message(conn) : "");
        exit(1);
    }
}

int main(int argc, char **argv) {
    pc_conn *conn;
    pc_service found[4];
    size_t count = 0, size = 0;
    uint64_t handle;
    void *registers;
    int writable, checked = 0, inheritable = 0, status;
    char list[1024] = "", script[1400], before[MAX_FD], after[MAX_FD];
    int fd;
    pid_t child;
    if (argc != 2) {
        fprintf(stderr, "usage: cloexec RUN_DIR\n");
        return 2;
    }
    open_now(before);
    /* "-": the library finds the broker itself. */
    check(pc_connect(strcmp(argv[1], "-") == 0 ? NULL : argv[1], &conn), "connect", NULL);
    check(pc_find_services(conn, NULL, "sample0", found, 4, &count), "find", conn);
    if (count == 0) return 1;
    check(pc_open(conn, found[0].id, 0, &handle), "open", conn);
    check(pc_map_memory(conn, handle, 0, &registers, &size, &writable), "map", conn);
    check(pc_ring_enable(conn, 0, 0, PC_RING_SLEEP), "ring", conn);

    open_now(after);
    for (fd = 0; fd < MAX_FD; fd++) {
        char number[16];
        if (!after[fd] || before[fd]) continue;
        checked++;
        if ((fcntl(fd, F_GETFD) & FD_CLOEXEC) == 0) {
            inheritable++;
            fprintf(stderr, "descriptor %d is not close-on-exec\n", fd);
        }
        snprintf(number, sizeof number, "%d ", fd);
        if (strlen(list) + strlen(number) < sizeof list) strcat(list, number);
    }
    printf("descriptors checked: %d\ninheritable: %d\n", checked, inheritable);
    fflush(stdout);

    snprintf(script, sizeof script,
             "n=0; for f in %s; do [ -e /proc/$$/fd/$f ] && n=$((n+1)); done; echo \"child sees: $n\"", list);
    child = fork();
    if (child == 0) {
        execl("/bin/sh", "sh", "-c", script, (char *)NULL);
        _exit(127);
    }
    if (child < 0 || waitpid(child, &status, 0) != child || !WIFEXITED(status) || WEXITSTATUS(status) != 0) return 1;
    pc_unmap_memory(registers, size);
    pc_disconnect(conn);
    return checked > 0 ? 0 : 1;
}
