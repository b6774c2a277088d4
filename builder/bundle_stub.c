/* The host bundle's launcher: the first bytes of the file `mbrescue bundle` writes.
 *
 * A static executable (it needs nothing on the host but a Linux kernel with /proc)
 * followed by a payload: the rescue kit's dynamic loader, Python interpreter, shared
 * libraries, extension modules and two zip archives (the standard-library modules the
 * host side imports, and the host side itself). The launcher copies each payload file
 * into its own memfd (anonymous memory: nothing is unpacked onto any file system, and
 * the kernel frees it all when the last process holding it ends, whatever ends it),
 * seals it read-only, and replaces itself with the bundled loader running the bundled
 * interpreter. What to run is not decided here but by the payload's own argument and
 * environment templates (written by builder/bundle.py), where `{N}` stands for the
 * /proc/self/fd path of payload file N, `{argv0}` for the name the bundle was run by and
 * `{exe}` for the bundle file's absolute path (what `install` will copy).
 *
 * Layout, all integers little-endian:
 *   [this program][file data ...][index][index offset: u64]["MBRBND01"]
 *   index: u32 file count, then per file u64 offset, u64 stored size, u64 size,
 *          NUL-terminated name (stored size < size: a zlib stream, inflated here);
 *          u32 argument count, then NUL-terminated argument templates;
 *          u32 environment count, then NUL-terminated "NAME=value" templates.
 * The inherited environment is kept except the bundle's own names, PYTHON* and LD_*, so that a
 * host's Python settings cannot steer the bundled interpreter.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#define MAGIC "MBRBND01"
#define MFD_EXEC_FLAG 0x0010U /* MFD_EXEC, Linux 6.3 */
#define TRAILER_BYTES 16
#define MAX_FILES 256
#define MAX_INDEX_BYTES (1 << 20)

static void fail(const char *what, int error) {
    if (error)
        fprintf(stderr, "mbrescue: error: bundle: %s: %s\n", what, strerror(error));
    else
        fprintf(stderr, "mbrescue: error: bundle: %s\n", what);
    exit(127);
}

static uint64_t get_u64(const unsigned char *at) {
    uint64_t value = 0;
    for (int i = 7; i >= 0; i--)
        value = (value << 8) | at[i];
    return value;
}

static uint32_t get_u32(const unsigned char *at) {
    return (uint32_t)at[0] | (uint32_t)at[1] << 8 | (uint32_t)at[2] << 16 | (uint32_t)at[3] << 24;
}

struct cursor {
    const unsigned char *at, *end;
};

static uint64_t take(struct cursor *c, int bytes) {
    if (c->end - c->at < bytes)
        fail("damaged index (short)", 0);
    uint64_t value = bytes == 8 ? get_u64(c->at) : get_u32(c->at);
    c->at += bytes;
    return value;
}

static const char *take_string(struct cursor *c) {
    const unsigned char *nul = memchr(c->at, 0, (size_t)(c->end - c->at));
    if (!nul)
        fail("damaged index (unterminated string)", 0);
    const char *text = (const char *)c->at;
    c->at = nul + 1;
    return text;
}

static int file_fds[MAX_FILES];
static uint32_t file_count;
static const char *argv0;
static char exe_path[4096];

/* Expand `{N}` and `{argv0}` in a template; the result is malloc'ed. */
static char *expand(const char *template) {
    size_t cap = strlen(template) + 1, len = 0;
    char *out = malloc(cap);
    if (!out)
        fail("out of memory", 0);
    for (const char *p = template; *p;) {
        char piece[64];
        const char *add = NULL;
        size_t add_len = 0;
        if (*p == '{') {
            const char *close = strchr(p, '}');
            if (!close)
                fail("damaged template (no closing brace)", 0);
            if ((size_t)(close - p) == 6 && strncmp(p, "{argv0}", 7) == 0) {
                add = argv0;
            } else if ((size_t)(close - p) == 4 && strncmp(p, "{exe}", 5) == 0) {
                add = exe_path;
            } else {
                char *stop;
                unsigned long n = strtoul(p + 1, &stop, 10);
                if (stop != close || stop == p + 1 || n >= file_count)
                    fail("damaged template (bad file number)", 0);
                snprintf(piece, sizeof piece, "/proc/self/fd/%d", file_fds[n]);
                add = piece;
            }
            add_len = strlen(add);
            p = close + 1;
        } else {
            add = p;
            add_len = 1;
            p++;
        }
        if (len + add_len + 1 > cap) {
            cap = (len + add_len + 1) * 2;
            out = realloc(out, cap);
            if (!out)
                fail("out of memory", 0);
        }
        memcpy(out + len, add, add_len);
        len += add_len;
    }
    out[len] = 0;
    return out;
}

static void write_all(int fd, const unsigned char *data, size_t length) {
    while (length > 0) {
        ssize_t done = write(fd, data, length);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            fail("writing the payload into memory", done < 0 ? errno : EIO);
        data += done;
        length -= (size_t)done;
    }
}

static void inflate_into(int fd, int self, uint64_t offset, uint64_t stored, uint64_t size) {
    static unsigned char in[1 << 16], out[1 << 18];
    z_stream z;
    memset(&z, 0, sizeof z);
    if (inflateInit(&z) != Z_OK)
        fail("inflateInit", 0);
    uint64_t read_bytes = 0, written = 0;
    int status = Z_OK;
    while (status != Z_STREAM_END) {
        if (z.avail_in == 0) {
            if (read_bytes == stored)
                fail("damaged payload (zlib stream ends early)", 0);
            size_t want = stored - read_bytes > sizeof in ? sizeof in : (size_t)(stored - read_bytes);
            ssize_t got = pread(self, in, want, (off_t)(offset + read_bytes));
            if (got <= 0)
                fail("reading the payload", got < 0 ? errno : EIO);
            read_bytes += (uint64_t)got;
            z.next_in = in;
            z.avail_in = (uInt)got;
        }
        z.next_out = out;
        z.avail_out = sizeof out;
        status = inflate(&z, Z_NO_FLUSH);
        if (status != Z_OK && status != Z_STREAM_END)
            fail("damaged payload (zlib)", 0);
        size_t produced = sizeof out - z.avail_out;
        written += produced;
        if (written > size)
            fail("damaged payload (longer than its index says)", 0);
        write_all(fd, out, produced);
    }
    inflateEnd(&z);
    if (written != size)
        fail("damaged payload (shorter than its index says)", 0);
}

static int copy_to_memfd(int self, const char *name, uint64_t offset, uint64_t stored,
                         uint64_t size) {
    /* Linux 6.3+ may make memfds non-executable unless asked (vm.memfd_noexec=1);
     * older kernels do not know the flag and refuse it: then ask without. */
    int fd = memfd_create(name, MFD_ALLOW_SEALING | MFD_EXEC_FLAG);
    if (fd < 0 && errno == EINVAL)
        fd = memfd_create(name, MFD_ALLOW_SEALING);
    if (fd < 0)
        fail("memfd_create (Linux 3.17 or later is needed)", errno);
    if (stored != size) {
        inflate_into(fd, self, offset, stored, size);
        fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL);
        return fd;
    }
    off_t from = (off_t)offset;
    uint64_t left = size;
    while (left > 0) {
        ssize_t done = sendfile(fd, self, &from, left > (1 << 30) ? (1 << 30) : (size_t)left);
        if (done < 0 && errno == EINTR)
            continue;
        if (done <= 0)
            fail("copying the payload into memory", done < 0 ? errno : EIO);
        left -= (uint64_t)done;
    }
    /* Read-only from here on: what runs is exactly what the bundle holds. */
    fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL);
    return fd;
}

int main(int argc, char **argv) {
    extern char **environ;
    argv0 = argc > 0 && argv[0] ? argv[0] : "mbrescue";
    int self = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (self < 0)
        fail("cannot open /proc/self/exe (is /proc mounted?)", errno);
    ssize_t exe_bytes = readlink("/proc/self/exe", exe_path, sizeof exe_path - 1);
    exe_path[exe_bytes > 0 ? exe_bytes : 0] = 0;
    struct stat st;
    if (fstat(self, &st) != 0)
        fail("fstat", errno);
    unsigned char trailer[TRAILER_BYTES];
    if (st.st_size < TRAILER_BYTES ||
        pread(self, trailer, TRAILER_BYTES, st.st_size - TRAILER_BYTES) != TRAILER_BYTES ||
        memcmp(trailer + 8, MAGIC, 8) != 0)
        fail("no payload found: the file is truncated or not an mbrescue bundle", 0);
    uint64_t index_at = get_u64(trailer);
    uint64_t index_end = (uint64_t)st.st_size - TRAILER_BYTES;
    if (index_at >= index_end || index_end - index_at > MAX_INDEX_BYTES)
        fail("damaged index (offset)", 0);
    size_t index_bytes = (size_t)(index_end - index_at);
    unsigned char *index = malloc(index_bytes);
    if (!index || pread(self, index, index_bytes, (off_t)index_at) != (ssize_t)index_bytes)
        fail("reading the index", errno);
    struct cursor c = {index, index + index_bytes};

    file_count = (uint32_t)take(&c, 4);
    if (file_count > MAX_FILES)
        fail("damaged index (file count)", 0);
    for (uint32_t i = 0; i < file_count; i++) {
        uint64_t offset = take(&c, 8), stored = take(&c, 8), size = take(&c, 8);
        const char *name = take_string(&c);
        if (offset > index_at || stored > index_at - offset || stored > size)
            fail("damaged index (file extent)", 0);
        file_fds[i] = copy_to_memfd(self, name, offset, stored, size);
    }
    uint32_t arg_count = (uint32_t)take(&c, 4);
    if (arg_count > 4096)
        fail("damaged index (argument count)", 0);
    char **args = calloc((size_t)arg_count + (size_t)argc + 1, sizeof *args);
    if (!args)
        fail("out of memory", 0);
    size_t n = 0;
    for (uint32_t i = 0; i < arg_count; i++)
        args[n++] = expand(take_string(&c));
    for (int i = 1; i < argc; i++)
        args[n++] = argv[i];
    args[n] = NULL;

    uint32_t env_count = (uint32_t)take(&c, 4);
    if (env_count > 4096)
        fail("damaged index (environment count)", 0);
    size_t inherited = 0;
    while (environ && environ[inherited])
        inherited++;
    char **env = calloc(inherited + env_count + 1, sizeof *env);
    if (!env)
        fail("out of memory", 0);
    /* The bundle's own variables first and unconditionally; an inherited variable of the
     * same name, any PYTHON* and any LD_* (the bundled loader would honour LD_PRELOAD or
     * LD_AUDIT, loading a library the bundle does not hold) never reaches the child. */
    size_t e = 0;
    for (uint32_t i = 0; i < env_count; i++)
        env[e++] = expand(take_string(&c));
    size_t own = e;
    for (size_t i = 0; i < inherited; i++) {
        const char *name = environ[i];
        size_t name_len = strcspn(name, "=");
        int drop = strncmp(name, "PYTHON", 6) == 0 || strncmp(name, "LD_", 3) == 0 ||
                   strncmp(name, "MBRESCUE_BUNDLE", 15) == 0 ||
                   strncmp(name, "MBRESCUE_EXTENSIONS", 19) == 0;
        for (size_t k = 0; k < own && !drop; k++)
            drop = strncmp(env[k], name, name_len) == 0 && env[k][name_len] == '=';
        if (!drop)
            env[e++] = environ[i];
    }
    env[e] = NULL;
    if (arg_count == 0)
        fail("damaged index (nothing to run)", 0);
    execve(args[0], args, env);
    fail(errno == EACCES ? "starting the bundled loader (is vm.memfd_noexec set to 2?)"
                         : "starting the bundled loader", errno);
    return 127;
}
