/* Adds two numbers on the sample device through libportcullis.
 *   make example && build/add [RUN_DIR]
 */
#include <inttypes.h>
#include <stdio.h>

#include <portcullis.h>
#include <portcullis/sample.h>

int main(int argc, char **argv) {
    pc_conn *conn;
    pc_service sample;
    size_t found = 0;
    uint64_t handle, args[2] = {2, 3}, sum = 0;
    uint32_t n_out = 1;
    int rc = pc_connect(argc > 1 ? argv[1] : NULL, &conn);
    if (rc != PC_SUCCESS) {
        fprintf(stderr, "connect: %s\n", pc_status_name(rc));
        return 1;
    }
    rc = pc_find_services(conn, PC_SAMPLE_CLASS, "sample0", &sample, 1, &found);
    if (rc == PC_SUCCESS && found == 0) rc = PC_NO_DEVICE;
    if (rc == PC_SUCCESS) rc = pc_open(conn, sample.id, 0, &handle);
    if (rc == PC_SUCCESS) rc = pc_call(conn, handle, PC_SAMPLE_ADD, args, 2, &sum, &n_out, NULL, 0, NULL, NULL);
    if (rc != PC_SUCCESS) {
        fprintf(stderr, "%s: %s (rule: %s)\n", pc_status_name(rc), pc_last_message(conn), pc_last_rule(conn));
        pc_disconnect(conn);
        return 1;
    }
    printf("%" PRIu64 " + %" PRIu64 " = %" PRIu64 "\n", args[0], args[1], sum);
    pc_disconnect(conn);
    return 0;
}
