/* The compiled conversion of one wal2json change row (see wal2json.fast_converter).
 *
 * convert(codes, plan, value_json, data) reads one wal2json format-version 2 row of an
 * INSERT, UPDATE or DELETE and returns a Converted (action, lsn, schema, table, fields,
 * ambiguous) whose fields are the row's primary_key, before and after as fields of COPY's text
 * format, tab-separated: the same bytes as the pure path's ChangeRow.copy_line gives for them
 * (the pure path stays the reference). It returns None for every row it
 * does not take: begin, commit, message, truncate, a composite key, a name with an escape, more
 * than MAX_COLUMNS columns, anything not shaped as wal2json writes it. The caller then parses the
 * row the pure way, so that every rare case has one implementation.
 *
 * codes maps a type OID to what its values need (CODE_* below, or the TypeInfo to hand to the
 * Python value_json); a missing OID is asked of plan(oid), which adds it to codes. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define MAX_COLUMNS 128

enum {
    CODE_PASS = 0,          /* wal2json's JSON already is to_jsonb's */
    CODE_PASS_SPECIALS = 1, /* the same; a null may be NaN or +-Infinity */
    CODE_TIMESTAMPTZ = 2,
    CODE_TIMESTAMP = 3,
    CODE_JSON = 4,          /* json and jsonb: the string's text is the value */
    CODE_ARRAY_STRING = 5,  /* arrays of strings and dates, delimiter ',' */
    CODE_ARRAY_NUMBER = 6,
    CODE_ARRAY_BOOL = 7,
};

typedef struct {
    const char *p;
    Py_ssize_t n;
} Span;

typedef struct {
    Span name;  /* the name's JSON string, quotes included */
    Span value; /* the value's raw JSON */
    unsigned long oid;
    PyObject *converted; /* a new reference to value_json's bytes, or NULL */
    Py_ssize_t at, len;  /* else, when len >= 0, the converted value in the arena */
    int ambiguous;
} Col;

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

/* Append b's bytes to the bytearray array (nothing when b is empty); -1 with an exception set. */
static int extend_bytearray(PyObject *array, const Buf *b) {
    if (b->len == 0)
        return 0;
    Py_ssize_t at = PyByteArray_GET_SIZE(array);
    if (PyByteArray_Resize(array, at + b->len) < 0)
        return -1;
    memcpy(PyByteArray_AS_STRING(array) + at, b->data, b->len);
    return 0;
}

static int buf_grow(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + more)
        cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int buf_put(Buf *b, const char *p, Py_ssize_t n) {
    if (n == 0) /* memcpy with a NULL b->data (nothing written yet) is undefined even for 0 bytes */
        return 0;
    if (buf_grow(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

static int buf_putc(Buf *b, char c) { return buf_put(b, &c, 1); }

/* -- scanning wal2json's JSON ------------------------------------------------------------ */

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static const char *skip_ws(const char *p, const char *end) {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r'))
        p++;
    return p;
}

/* p at the opening quote: the position after the closing one, or NULL; *escaped says whether
 * it holds a backslash. */
static const char *scan_string(const char *p, const char *end, int *escaped) {
    p++;
    *escaped = 0;
    while (p < end) { /* a plain loop: wal2json's strings are short, memchr's set-up costs more */
        char c = *p;
        if (c == '"')
            return p + 1;
        if (c == '\\') {
            *escaped = 1;
            p += 2;
        } else
            p++;
    }
    return NULL;
}

static const char *skip_value(const char *p, const char *end) {
    int escaped;
    if (p >= end)
        return NULL;
    if (*p == '"')
        return scan_string(p, end, &escaped);
    if (*p == '{' || *p == '[') {
        int depth = 0;
        while (p < end) {
            if (*p == '"') {
                p = scan_string(p, end, &escaped);
                if (p == NULL)
                    return NULL;
                continue;
            }
            if (*p == '{' || *p == '[')
                depth++;
            else if (*p == '}' || *p == ']') {
                if (--depth == 0)
                    return p + 1;
            }
            p++;
        }
        return NULL;
    }
    while (p < end && *p != ',' && *p != '}' && *p != ']' && *p != ' ')
        p++;
    return p;
}

/* Whether a name's bytes (a JSON string, quotes included) are UTF-8 as msgspec demands of a str
 * field (no overlong form, no surrogate, nothing past U+10FFFF). The pure path refuses a row whose
 * name is not (msgspec.DecodeError): so does this (wal2json writes such bytes for a SQL_ASCII
 * database). Values need no check: the pure path keeps them as raw bytes too. */
static int name_is_utf8(Span s) {
    const unsigned char *p = (const unsigned char *)s.p, *end = p + s.n;
    uint64_t word;
    for (; end - p >= 8; p += 8) { /* the usual all-ASCII name, 8 bytes at a time */
        memcpy(&word, p, 8);
        if (word & 0x8080808080808080ULL)
            break;
    }
    while (p < end) {
        unsigned c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        int more = c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2 : c >= 0xF0 && c <= 0xF4 ? 3 : -1;
        if (more < 0 || end - p <= more)
            return 0;
        unsigned lo = 0x80, hi = 0xBF; /* the second byte's range */
        if (c == 0xE0) lo = 0xA0;
        else if (c == 0xED) hi = 0x9F;
        else if (c == 0xF0) lo = 0x90;
        else if (c == 0xF4) hi = 0x8F;
        if (p[1] < lo || p[1] > hi)
            return 0;
        for (int i = 2; i <= more; i++)
            if ((p[i] & 0xC0) != 0x80)
                return 0;
        p += more + 1;
    }
    return 1;
}

#define span_is(s, literal) ((s).n == (Py_ssize_t)sizeof(literal) - 1 && memcmp((s).p, literal, sizeof(literal) - 1) == 0)

static int span_eq(Span a, Span b) { return a.n == b.n && memcmp(a.p, b.p, a.n) == 0; }

/* Reads an object's members: calls member(key without quotes, value start) which returns the
 * position after the value, or NULL to refuse the row. */
typedef const char *(*Member)(void *ctx, Span key, const char *p, const char *end);

/* *pp at an object or array: 0 with *pp at its first member, 1 with *pp past it when it is
 * empty, -1 when it is not one. */
static int open_container(const char **pp, const char *end, char open, char close) {
    const char *p = skip_ws(*pp, end);
    if (p >= end || *p != open)
        return -1;
    p = skip_ws(p + 1, end);
    *pp = (p < end && *p == close) ? p + 1 : p;
    return *pp == p + 1 && p < end && *p == close;
}

/* After a member (at, NULL when it was refused): 1 with *pp at the next one, 0 with *pp past the
 * container's close, -1 when neither follows. */
static int next_member(const char **pp, const char *at, const char *end, char close) {
    if (at == NULL)
        return -1;
    at = skip_ws(at, end);
    if (at < end && *at == ',') {
        *pp = skip_ws(at + 1, end);
        return 1;
    }
    *pp = at + 1;
    return (at < end && *at == close) ? 0 : -1;
}

static const char *read_object(const char *p, const char *end, Member member, void *ctx) {
    int escaped, opened = open_container(&p, end, '{', '}');
    if (opened != 0)
        return opened > 0 ? p : NULL;
    while (p < end) {
        if (*p != '"')
            return NULL;
        const char *k = p;
        p = scan_string(p, end, &escaped);
        if (p == NULL || escaped)
            return NULL;
        Span key = {k + 1, p - k - 2};
        p = skip_ws(p, end);
        if (p >= end || *p != ':')
            return NULL;
        p = skip_ws(p + 1, end);
        int more = next_member(&p, member(ctx, key, p, end), end, '}');
        if (more <= 0)
            return more < 0 ? NULL : p;
    }
    return NULL;
}

typedef struct {
    Col *cols;
    int n;
    Col *current;
} ColList;

static const char *column_member(void *ctx, Span key, const char *p, const char *end) {
    Col *col = ((ColList *)ctx)->current;
    int escaped;
    const char *after;
    if (span_is(key, "name")) {
        if (*p != '"')
            return NULL;
        after = scan_string(p, end, &escaped);
        if (after == NULL || escaped)
            return NULL; /* a name with an escape: the pure path re-encodes it */
        col->name = (Span){p, after - p};
        if (!name_is_utf8(col->name))
            return NULL;
        return after;
    }
    if (span_is(key, "typeoid")) {
        char *stop;
        col->oid = strtoul(p, &stop, 10);
        return stop == p ? NULL : stop;
    }
    after = skip_value(p, end);
    if (after != NULL && span_is(key, "value"))
        col->value = (Span){p, after - p};
    return after;
}

/* Reads an array: calls element(ctx, p) for each element, which returns the position after it
 * or NULL to refuse the row. null is an empty array. */
typedef const char *(*Element)(void *ctx, const char *p, const char *end);

static const char *read_array(const char *p, const char *end, Element element, void *ctx) {
    p = skip_ws(p, end);
    if (p < end && *p == 'n')
        return skip_value(p, end);
    int opened = open_container(&p, end, '[', ']');
    if (opened != 0)
        return opened > 0 ? p : NULL;
    while (p < end) {
        int more = next_member(&p, element(ctx, p, end), end, ']');
        if (more <= 0)
            return more < 0 ? NULL : p;
    }
    return NULL;
}

#define LITERAL(p, end, text) ((end) - (p) >= (Py_ssize_t)sizeof(text) - 1 && memcmp(p, text, sizeof(text) - 1) == 0)

/* A column object as the poller's options make wal2json write it, {"name":"…","typeoid":N,
 * "value":…}, read without the general object walk; NULL for any other shape. */
static const char *column_as_written(Col *col, const char *p, const char *end) {
    int escaped;
    if (!LITERAL(p, end, "{\"name\":\""))
        return NULL;
    const char *name = p + 8, *q = scan_string(name, end, &escaped);
    if (q == NULL || escaped || !LITERAL(q, end, ",\"typeoid\":"))
        return NULL;
    q += 11;
    const char *digits = q;
    unsigned long oid = 0;
    while (q < end && is_digit(*q) && q - digits < 10)
        oid = oid * 10 + (unsigned long)(*q++ - '0');
    if (q == digits || !LITERAL(q, end, ",\"value\":"))
        return NULL;
    const char *value = q + 9;
    q = skip_value(value, end);
    if (q == NULL || q == value || q >= end || *q != '}')
        return NULL;
    col->name = (Span){name, scan_string(name, end, &escaped) - name};
    if (!name_is_utf8(col->name))
        return NULL;
    col->oid = oid;
    col->value = (Span){value, q - value};
    return q + 1;
}

/* One column object into list->cols. */
static const char *column_element(void *ctx, const char *p, const char *end) {
    ColList *list = ctx;
    if (list->n >= MAX_COLUMNS)
        return NULL;
    Col *col = &list->cols[list->n++];
    memset(col, 0, sizeof *col);
    col->len = -1;
    col->oid = (unsigned long)-1;
    const char *fast = column_as_written(col, p, end);
    if (fast != NULL)
        return fast;
    list->current = col;
    p = read_object(p, end, column_member, list);
    if (p == NULL || col->name.p == NULL || col->value.p == NULL || col->oid == (unsigned long)-1)
        return NULL;
    return p;
}

typedef struct {
    char action;
    Span lsn, schema, table;
    ColList columns, identity;
    int pk_count;
    Span pk_name;
} Row;

static const char *pk_member(void *ctx, Span key, const char *p, const char *end) {
    Row *row = ctx;
    if (span_is(key, "name") && *p == '"') {
        int escaped;
        const char *after = scan_string(p, end, &escaped);
        if (after == NULL || escaped)
            return NULL;
        row->pk_name = (Span){p, after - p};
        if (!name_is_utf8(row->pk_name))
            return NULL;
        return after;
    }
    return skip_value(p, end);
}

static const char *pk_element(void *ctx, const char *p, const char *end) {
    Row *row = ctx;
    if (++row->pk_count > 1)
        return NULL; /* a composite key: its order comes from the catalog */
    return read_object(p, end, pk_member, row);
}

static const char *row_member(void *ctx, Span key, const char *p, const char *end) {
    Row *row = ctx;
    int escaped;
    const char *after;
    if (span_is(key, "columns"))
        return read_array(p, end, column_element, &row->columns);
    if (span_is(key, "identity"))
        return read_array(p, end, column_element, &row->identity);
    if (span_is(key, "pk"))
        return read_array(p, end, pk_element, row);
    after = skip_value(p, end);
    if (after == NULL)
        return NULL;
    if (span_is(key, "action") || span_is(key, "lsn") || span_is(key, "schema") || span_is(key, "table")) {
        if (*p != '"' || scan_string(p, end, &escaped) != after || escaped)
            return NULL;
        Span text = {p + 1, after - p - 2};
        if (span_is(key, "action")) {
            if (text.n != 1 || (text.p[0] != 'I' && text.p[0] != 'U' && text.p[0] != 'D'))
                return NULL;
            row->action = text.p[0];
        } else if (span_is(key, "lsn"))
            row->lsn = text;
        else if (!name_is_utf8(text))
            return NULL;
        else if (span_is(key, "schema"))
            row->schema = text;
        else
            row->table = text;
    }
    return after;
}

/* -- values ------------------------------------------------------------------------------ */

/* The text of a JSON string (s at its opening quote) into out, as UTF-8. 0, or -1 for an escape
 * this does not take (a surrogate: the pure path decides). */
static int unescape(Span s, Buf *out) {
    const char *p = s.p + 1, *end = s.p + s.n - 1;
    while (p < end) {
        const char *bs = memchr(p, '\\', end - p);
        if (bs == NULL)
            return buf_put(out, p, end - p);
        if (buf_put(out, p, bs - p) < 0)
            return -1;
        if (bs + 1 >= end)
            return -1;
        char c = bs[1], r;
        p = bs + 2;
        switch (c) {
        case '"': r = '"'; break;
        case '\\': r = '\\'; break;
        case '/': r = '/'; break;
        case 'b': r = '\b'; break;
        case 'f': r = '\f'; break;
        case 'n': r = '\n'; break;
        case 'r': r = '\r'; break;
        case 't': r = '\t'; break;
        case 'u': {
            if (end - p < 4)
                return -1;
            char hex[5] = {p[0], p[1], p[2], p[3], 0}, *stop;
            unsigned long cp = strtoul(hex, &stop, 16);
            if (stop != hex + 4 || cp == 0 || (cp >= 0xD800 && cp <= 0xDFFF))
                return -1;
            p += 4;
            char u[3];
            if (cp < 0x80) {
                if (buf_putc(out, (char)cp) < 0)
                    return -1;
            } else if (cp < 0x800) {
                u[0] = (char)(0xC0 | (cp >> 6));
                u[1] = (char)(0x80 | (cp & 0x3F));
                if (buf_put(out, u, 2) < 0)
                    return -1;
            } else {
                u[0] = (char)(0xE0 | (cp >> 12));
                u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
                u[2] = (char)(0x80 | (cp & 0x3F));
                if (buf_put(out, u, 3) < 0)
                    return -1;
            }
            continue;
        }
        default:
            return -1;
        }
        if (buf_putc(out, r) < 0)
            return -1;
    }
    return 0;
}

/* A string as Python's json.dumps(ensure_ascii=False) writes it. */
static int dump_string(const char *p, Py_ssize_t n, Buf *out) {
    static const char hexdigits[] = "0123456789abcdef";
    if (buf_putc(out, '"') < 0)
        return -1;
    const char *run = p, *end = p + n;
    for (; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        if (buf_put(out, run, p - run) < 0)
            return -1;
        run = p + 1;
        char esc[6] = {'\\', 0};
        Py_ssize_t len = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0';
            esc[4] = hexdigits[c >> 4]; esc[5] = hexdigits[c & 15];
            len = 6;
        }
        if (buf_put(out, esc, len) < 0)
            return -1;
    }
    if (buf_put(out, run, end - run) < 0)
        return -1;
    return buf_putc(out, '"');
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? over the whole of p..p+n */
static int is_json_number(const char *p, Py_ssize_t n) {
    const char *end = p + n;
    if (p < end && *p == '-')
        p++;
    if (p >= end || *p < '0' || *p > '9')
        return 0;
    if (*p == '0')
        p++;
    else
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return 0;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return 0;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    return p == end;
}

/* A timestamp's JSON string as to_jsonb writes it (wal2json._timestamp_json). */
static int timestamp_json(Span raw, int with_zone, Buf *out) {
    const char *p = raw.p, *end = raw.p + raw.n;
    if (raw.n < 2 || !is_digit(p[1]))
        return buf_put(out, p, raw.n);
    const char *space = memchr(p, ' ', raw.n);
    Py_ssize_t start = out->len;
    if (buf_put(out, p, raw.n) < 0)
        return -1;
    if (space != NULL)
        out->data[start + (space - p)] = 'T';
    if (!with_zone)
        return 0;
    /* [+-]dd without minutes (then " BC"?) before the closing quote: add ":00" after dd. */
    const char *q = end - 1; /* the closing quote */
    if (q - p >= 3 && memcmp(q - 3, " BC", 3) == 0)
        q -= 3;
    if (q - p >= 3 && (q[-3] == '+' || q[-3] == '-') && is_digit(q[-2]) && is_digit(q[-1])) {
        Py_ssize_t at = start + (q - p);
        if (buf_grow(out, 3) < 0)
            return -1;
        memmove(out->data + at + 3, out->data + at, out->len - at);
        memcpy(out->data + at, ":00", 3);
        out->len += 3;
    }
    return 0;
}

/* PostgreSQL's array text (wal2json.parse_array) into JSON (wal2json._array_json): 0, or -1
 * for anything this does not take (the caller hands the value to the pure path). An array has
 * at most MAXDIM (6) dimensions: deeper nesting, which no server writes, is refused rather than
 * recursed into (a million '{' overflowed the C stack). */
static int array_level(const char **pp, const char *end, int code, Buf *out, Buf *item, int depth) {
    const char *p = *pp;
    if (p >= end || *p != '{' || depth > 6)
        return -1;
    p++;
    if (buf_putc(out, '[') < 0)
        return -1;
    if (p < end && *p == '}') {
        *pp = p + 1;
        return buf_putc(out, ']');
    }
    int first = 1;
    while (p < end) {
        if (!first && buf_put(out, ", ", 2) < 0)
            return -1;
        first = 0;
        if (*p == '{') {
            if (array_level(&p, end, code, out, item, depth + 1) < 0)
                return -1;
        } else {
            int quoted = *p == '"';
            item->len = 0;
            if (quoted) {
                p++;
                while (p < end && *p != '"') {
                    if (*p == '\\') {
                        if (p + 1 >= end)
                            return -1;
                        p++;
                    }
                    if (buf_putc(item, *p) < 0)
                        return -1;
                    p++;
                }
                if (p >= end)
                    return -1;
                p++;
            } else {
                const char *s = p;
                while (p < end && *p != ',' && *p != '}')
                    p++;
                if (p == s || (unsigned char)s[0] <= ' ' || (unsigned char)p[-1] <= ' ')
                    return -1; /* what the pure path's strip would change: its business */
                if (p - s == 4 && strncasecmp(s, "NULL", 4) == 0) {
                    if (buf_put(out, "null", 4) < 0)
                        return -1;
                    goto next;
                }
                if (buf_put(item, s, p - s) < 0)
                    return -1;
            }
            if (code == CODE_ARRAY_BOOL) {
                int t = (item->len == 1 && item->data[0] == 't') || (item->len == 4 && memcmp(item->data, "true", 4) == 0);
                if (buf_put(out, t ? "true" : "false", t ? 4 : 5) < 0)
                    return -1;
            } else if (code == CODE_ARRAY_NUMBER && is_json_number(item->data, item->len)) {
                if (buf_put(out, item->data, item->len) < 0)
                    return -1;
            } else if (dump_string(item->data, item->len, out) < 0)
                return -1;
        }
    next:
        if (p < end && *p == '}') {
            *pp = p + 1;
            return buf_putc(out, ']');
        }
        if (p >= end || *p != ',')
            return -1;
        p++;
    }
    return -1;
}

/* int2vector's and oidvector's text, its elements separated by spaces ('1 2 3', '' when empty),
 * into JSON (wal2json.parse_array): 0, or -1 for anything else. */
static int vector_json(const char *p, const char *end, int code, Buf *out) {
    if (code == CODE_ARRAY_BOOL || buf_putc(out, '[') < 0)
        return -1;
    for (const char *s = p; p < end; s = ++p) {
        while (p < end && *p != ' ') {
            if (!is_digit(*p) && *p != '-')
                return -1;
            p++;
        }
        if (p == s || p + 1 == end) /* not one space between two elements */
            return -1;
        if ((code == CODE_ARRAY_NUMBER && is_json_number(s, p - s) ? buf_put(out, s, p - s) : dump_string(s, p - s, out)) < 0 ||
            (p < end && buf_put(out, ", ", 2) < 0))
            return -1;
    }
    return buf_putc(out, ']');
}

static int array_json(Span raw, int code, Buf *out) {
    Buf text = {0}, item = {0};
    int result = -1;
    Py_ssize_t start = out->len;
    if (unescape(raw, &text) == 0) {
        const char *p = text.data, *tend = text.data + text.len;
        int bounds = p != NULL && *p == '['; /* explicit bounds, '[2:3]={1,2}': to_jsonb ignores them */
        if (bounds)
            p = (p = memchr(p, '=', text.len)) != NULL ? p + 1 : tend;
        if (p < tend && *p == '{') {
            result = array_level(&p, tend, code, out, &item, 1);
            if (result == 0 && p != tend)
                result = -1;
        } else if (!bounds)
            result = vector_json(p, tend, code, out);
    }
    if (result < 0) {
        if (PyErr_Occurred()) {
            PyMem_Free(text.data);
            PyMem_Free(item.data);
            return -2;
        }
        out->len = start;
    }
    PyMem_Free(text.data);
    PyMem_Free(item.data);
    return result;
}

typedef struct {
    PyObject *codes, *plan, *value_json;
    Buf arena; /* converted values, one after the other */
} Ctx;

/* The last codes found for an OID, per codes dict (strong references). */
static struct {
    PyObject *codes, *code;
    unsigned long oid;
} code_cache[64];

static PyObject *code_for(Ctx *ctx, unsigned long oid) { /* borrowed, or NULL with an error */
    unsigned slot = oid & 63;
    if (code_cache[slot].codes == ctx->codes && code_cache[slot].oid == oid)
        return code_cache[slot].code;
    PyObject *key = PyLong_FromUnsignedLong(oid);
    if (key == NULL)
        return NULL;
    PyObject *code = PyDict_GetItemWithError(ctx->codes, key);
    if (code != NULL)
        Py_INCREF(code);
    else if (!PyErr_Occurred())
        code = PyObject_CallOneArg(ctx->plan, key);
    Py_DECREF(key);
    if (code == NULL)
        return NULL;
    Py_XDECREF(code_cache[slot].codes);
    Py_XDECREF(code_cache[slot].code);
    Py_INCREF(ctx->codes);
    code_cache[slot].codes = ctx->codes;
    code_cache[slot].code = code;
    code_cache[slot].oid = oid;
    return code;
}

/* Convert one column's value: col->converted set when it differs from wal2json's text. */
static int convert_value(Ctx *ctx, Col *col) {
    PyObject *code = code_for(ctx, col->oid);
    if (code == NULL)
        return -1;
    int is_null = col->value.n == 4 && memcmp(col->value.p, "null", 4) == 0;
    int result = 0;
    if (!PyLong_CheckExact(code)) { /* a TypeInfo: the pure value_json */
        PyObject *raw = PyBytes_FromStringAndSize(col->value.p, col->value.n);
        col->converted = raw ? PyObject_CallFunctionObjArgs(ctx->value_json, code, raw, NULL) : NULL;
        Py_XDECREF(raw);
        if (col->converted == NULL || !PyBytes_Check(col->converted)) {
            result = -1;
            if (col->converted != NULL)
                PyErr_SetString(PyExc_TypeError, "value_json returned no bytes");
        } else if (PyBytes_GET_SIZE(col->converted) == 4 && memcmp(PyBytes_AS_STRING(col->converted), "null", 4) == 0) {
            PyObject *specials = PyObject_GetAttrString(code, "specials_as_null");
            if (specials == NULL)
                result = -1;
            else
                col->ambiguous = PyObject_IsTrue(specials) == 1;
            Py_XDECREF(specials);
        }
        return result;
    }
    long c = PyLong_AsLong(code);
    if (c == -1 && PyErr_Occurred()) /* a code past a long: its OverflowError, not a result with it set */
        return -1;
    if (c == CODE_PASS)
        return 0;
    if (c == CODE_PASS_SPECIALS) {
        col->ambiguous = is_null;
        return 0;
    }
    if (is_null)
        return 0;
    if (col->value.p[0] != '"') /* not the string wal2json writes for these: the pure path */
        return 1;
    Buf *out = &ctx->arena;
    Py_ssize_t start = out->len;
    int r;
    switch (c) {
    case CODE_TIMESTAMPTZ:
    case CODE_TIMESTAMP:
        r = timestamp_json(col->value, c == CODE_TIMESTAMPTZ, out);
        break;
    case CODE_JSON:
        r = unescape(col->value, out);
        if (r < 0 && !PyErr_Occurred())
            return 1;
        break;
    case CODE_ARRAY_STRING:
    case CODE_ARRAY_NUMBER:
    case CODE_ARRAY_BOOL:
        r = array_json(col->value, (int)c, out);
        if (r == -1)
            return 1;
        break;
    default:
        return 1;
    }
    if (r < 0)
        return -1;
    col->at = start;
    col->len = out->len - start;
    return 0;
}

static Span value_of(Col *col, Buf *arena) {
    if (col->converted != NULL)
        return (Span){PyBytes_AS_STRING(col->converted), PyBytes_GET_SIZE(col->converted)};
    if (col->len >= 0)
        return (Span){arena->data + col->at, col->len};
    return col->value;
}

/* Bytes as a field of COPY's text format (stitch.copy_escape). */
static int put_copy(Buf *b, const char *p, Py_ssize_t n) {
    if (buf_grow(b, 2 * n) < 0) /* at most every byte escaped */
        return -1;
    char *out = b->data + b->len;
    for (const char *end = p + n; p < end; p++) {
        char c = *p;
        if (c > '\\' || (c != '\\' && c != '\n' && c != '\r' && c != '\t' )) {
            *out++ = c;
            continue;
        }
        *out++ = '\\';
        *out++ = c == '\\' ? '\\' : c == '\n' ? 'n' : c == '\r' ? 'r' : 't';
    }
    b->len = out - b->data;
    return 0;
}

static int put_member(Buf *b, int *first, Col *col, Buf *arena) {
    if (!*first && buf_putc(b, ',') < 0)
        return -1;
    *first = 0;
    Span v = value_of(col, arena);
    if (put_copy(b, col->name.p, col->name.n) < 0 || buf_putc(b, ':') < 0)
        return -1;
    return put_copy(b, v.p, v.n);
}

static Col *find(ColList *list, Span name) {
    for (int i = 0; i < list->n; i++)
        if (span_eq(list->cols[i].name, name))
            return &list->cols[i];
    return NULL;
}

/* msgspec's encoding of a dict of these columns (with merge, {**merge, **cols}) into b, as a
 * COPY field. */
static int object_json(Buf *b, ColList *cols, ColList *merge, Buf *arena) {
    int first = 1;
    if (buf_putc(b, '{') < 0)
        return -1;
    if (merge != NULL) {
        for (int i = 0; i < merge->n; i++) {
            Col *newer = find(cols, merge->cols[i].name);
            if (put_member(b, &first, newer ? newer : &merge->cols[i], arena) < 0)
                return -1;
        }
    }
    for (int i = 0; i < cols->n; i++) {
        if (merge != NULL && find(merge, cols->cols[i].name) != NULL)
            continue;
        if (put_member(b, &first, &cols->cols[i], arena) < 0)
            return -1;
    }
    return buf_putc(b, '}');
}

/* -- the canonical form of the seal's hashes (README "A sealed trail") ------------------------
 *
 * What jsonb's output (jsonb_out, and so record_send) gives for a JSON text the destination
 * stores as jsonb: object keys sorted by length, then bytewise, a duplicate key's last value
 * kept, ", " and ": " between items, strings as escape_json writes them, numbers as numeric_out
 * prints them. canon_value returns the position after the value, or NULL (no error set) where
 * it cannot be sure of the server's text: a number with an exponent or a negative zero (numeric
 * prints neither as written), an escape unescape does not take, nesting past CANON_DEPTH. The
 * seal then leaves that change's hash to the server (bemi.seal_batch). */

#define CANON_DEPTH 64

typedef struct {
    Span key;   /* the key's text, unescaped (in the object's scratch buffer, or the input) */
    Py_ssize_t key_at; /* when key.p is NULL: its offset in the scratch buffer */
    const char *value;
    int order;
} CanonMember;

static int key_before(const CanonMember *a, const CanonMember *b) {
    if (a->key.n != b->key.n)
        return a->key.n < b->key.n;
    int c = memcmp(a->key.p, b->key.p, (size_t)a->key.n);
    return c != 0 ? c < 0 : a->order < b->order;
}

static void sort_members(CanonMember *m, Py_ssize_t n) { /* insertion sort: objects are small */
    for (Py_ssize_t i = 1; i < n; i++) {
        CanonMember x = m[i];
        Py_ssize_t j = i;
        for (; j > 0 && key_before(&x, &m[j - 1]); j--)
            m[j] = m[j - 1];
        m[j] = x;
    }
}

/* A JSON string's text (s at its opening quote, quotes included) as escape_json writes it:
 * 1 done, 0 cannot be sure, -1 error. */
static int canon_string(Span s, Buf *out, Buf *scratch) {
    int plain = 1;
    for (Py_ssize_t i = 1; i < s.n - 1; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (c == '\\' || c < 0x20) {
            plain = 0;
            break;
        }
    }
    if (plain)
        return buf_put(out, s.p, s.n) < 0 ? -1 : 1;
    scratch->len = 0;
    if (unescape(s, scratch) < 0)
        return PyErr_Occurred() ? -1 : 0;
    for (Py_ssize_t i = 0; i < scratch->len; i++)
        if (scratch->data[i] == 0)
            return 0;
    return dump_string(scratch->data ? scratch->data : "", scratch->len, out) < 0 ? -1 : 1;
}

static const char *canon_value(const char *p, const char *end, Buf *out, int depth, int *error);

static const char *canon_object(const char *p, const char *end, Buf *out, int depth, int *error) {
    CanonMember local[32], *m = local;
    Py_ssize_t n = 0, cap = 32;
    Buf keys = {0}, scratch = {0};
    const char *result = NULL;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        if (buf_put(out, "{}", 2) < 0)
            *error = 1;
        return *error ? NULL : p + 1;
    }
    for (;;) {
        int escaped;
        if (p >= end || *p != '"')
            goto done;
        const char *after = scan_string(p, end, &escaped);
        if (after == NULL)
            goto done;
        if (n == cap) {
            CanonMember *grown = PyMem_Malloc(sizeof(CanonMember) * (size_t)cap * 2);
            if (grown == NULL) {
                PyErr_NoMemory();
                *error = 1;
                goto done;
            }
            memcpy(grown, m, sizeof(CanonMember) * (size_t)n);
            if (m != local)
                PyMem_Free(m);
            m = grown;
            cap *= 2;
        }
        CanonMember *member = &m[n];
        member->order = (int)n;
        if (escaped) {
            Py_ssize_t at = keys.len;
            if (unescape((Span){p, after - p}, &keys) < 0) {
                *error = PyErr_Occurred() != NULL;
                goto done;
            }
            member->key = (Span){NULL, keys.len - at};
            member->key_at = at;
        } else {
            member->key = (Span){p + 1, after - p - 2};
        }
        p = skip_ws(after, end);
        if (p >= end || *p != ':')
            goto done;
        member->value = p = skip_ws(p + 1, end);
        p = skip_value(p, end);
        if (p == NULL)
            goto done;
        n++;
        p = skip_ws(p, end);
        if (p < end && *p == ',') {
            p = skip_ws(p + 1, end);
            continue;
        }
        if (p < end && *p == '}')
            break;
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (m[i].key.p == NULL)
            m[i].key.p = keys.data + m[i].key_at;
    sort_members(m, n);
    if (buf_putc(out, '{') < 0)
        goto fail;
    int first = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i + 1 < n && span_eq(m[i].key, m[i + 1].key))
            continue; /* a duplicate key: the last one counts */
        if (!first && buf_put(out, ", ", 2) < 0)
            goto fail;
        first = 0;
        Span key = m[i].key;
        int r = 1;
        for (Py_ssize_t j = 0; j < key.n && r; j++)
            if (key.p[j] == 0)
                r = 0; /* jsonb refuses \u0000 */
        if (!r)
            goto done;
        if (dump_string(key.p, key.n, out) < 0 || buf_put(out, ": ", 2) < 0)
            goto fail;
        if (canon_value(m[i].value, end, out, depth + 1, error) == NULL)
            goto done;
    }
    if (buf_putc(out, '}') < 0)
        goto fail;
    result = p + 1;
    goto done;
fail:
    *error = 1;
done:
    if (m != local)
        PyMem_Free(m);
    PyMem_Free(keys.data);
    PyMem_Free(scratch.data);
    return *error ? NULL : result;
}

static const char *canon_value(const char *p, const char *end, Buf *out, int depth, int *error) {
    p = skip_ws(p, end);
    if (p >= end || depth > CANON_DEPTH)
        return NULL;
    char c = *p;
    if (c == '"') {
        int escaped;
        const char *after = scan_string(p, end, &escaped);
        if (after == NULL)
            return NULL;
        Buf scratch = {0};
        int r = canon_string((Span){p, after - p}, out, &scratch);
        PyMem_Free(scratch.data);
        if (r < 0)
            *error = 1;
        return r > 0 ? after : NULL;
    }
    if (c == '{')
        return canon_object(p, end, out, depth, error);
    if (c == '[') {
        p = skip_ws(p + 1, end);
        if (buf_putc(out, '[') < 0) {
            *error = 1;
            return NULL;
        }
        if (p < end && *p == ']')
            return buf_putc(out, ']') < 0 ? (*error = 1, NULL) : p + 1;
        for (;;) {
            p = canon_value(p, end, out, depth + 1, error);
            if (p == NULL)
                return NULL;
            p = skip_ws(p, end);
            if (p < end && *p == ']')
                return buf_putc(out, ']') < 0 ? (*error = 1, NULL) : p + 1;
            if (p >= end || *p != ',' || buf_put(out, ", ", 2) < 0) {
                *error = p < end && *p == ',';
                return NULL;
            }
            p++;
        }
    }
    const char *start = p;
    if (c == 't' || c == 'f' || c == 'n') {
        const char *word = c == 't' ? "true" : c == 'f' ? "false" : "null";
        Py_ssize_t len = (Py_ssize_t)strlen(word);
        if (end - p < len || memcmp(p, word, (size_t)len) != 0)
            return NULL;
        return buf_put(out, p, len) < 0 ? (*error = 1, NULL) : p + len;
    }
    /* a number: canonical unless it has an exponent or is a negative zero */
    int negative = 0, nonzero = 0;
    if (p < end && *p == '-') {
        negative = 1;
        p++;
    }
    if (p >= end || !is_digit(*p))
        return NULL;
    while (p < end && (is_digit(*p) || *p == '.')) {
        nonzero |= *p >= '1' && *p <= '9';
        p++;
    }
    if (p < end && (*p == 'e' || *p == 'E'))
        return NULL;
    if ((negative && !nonzero) || !is_json_number(start, p - start))
        return NULL;
    return buf_put(out, start, p - start) < 0 ? (*error = 1, NULL) : p;
}

/* The canonical text of a row's object of these columns (with merge, as object_json): 1 done,
 * 0 cannot be sure, -1 error. Column names hold no escape (column_member refuses those). */
static int canon_columns(Buf *out, ColList *cols, ColList *merge, Buf *arena) {
    CanonMember m[2 * MAX_COLUMNS];
    Col *of[2 * MAX_COLUMNS];
    int n = 0;
    if (merge != NULL)
        for (int i = 0; i < merge->n; i++) {
            Col *newer = find(cols, merge->cols[i].name);
            of[n++] = newer ? newer : &merge->cols[i];
        }
    for (int i = 0; i < cols->n; i++)
        if (merge == NULL || find(merge, cols->cols[i].name) == NULL)
            of[n++] = &cols->cols[i];
    for (int i = 0; i < n; i++) {
        Span name = of[i]->name;
        for (Py_ssize_t j = 1; j < name.n - 1; j++)
            if ((unsigned char)name.p[j] < 0x20)
                return 0;
        m[i] = (CanonMember){{name.p + 1, name.n - 2}, 0, (const char *)of[i], i};
    }
    sort_members(m, n);
    if (buf_putc(out, '{') < 0)
        return -1;
    int first = 1;
    for (int i = 0; i < n; i++) {
        if (i + 1 < n && span_eq(m[i].key, m[i + 1].key))
            continue;
        Col *col = (Col *)m[i].value;
        Span v = value_of(col, arena);
        int error = 0;
        if ((!first && buf_put(out, ", ", 2) < 0) || buf_put(out, col->name.p, col->name.n) < 0 || buf_put(out, ": ", 2) < 0)
            return -1;
        const char *after = canon_value(v.p, v.p + v.n, out, 0, &error);
        if (error)
            return -1;
        if (after == NULL || skip_ws(after, v.p + v.n) != v.p + v.n)
            return 0;
        first = 0;
    }
    return buf_putc(out, '}') < 0 ? -1 : 1;
}

/* canonical(text: bytes) -> the canonical text of the JSON text, or None where it cannot be sure
 * (a context's, once per transaction: stitch.TransactionState.hash_parts). */
static PyObject *canonical(PyObject *self, PyObject *arg) {
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "canonical(text: bytes)");
        return NULL;
    }
    const char *p = PyBytes_AS_STRING(arg), *end = p + PyBytes_GET_SIZE(arg);
    Buf out = {0};
    int error = 0;
    const char *after = canon_value(p, end, &out, 0, &error);
    PyObject *result = NULL;
    if (!error) {
        if (after != NULL && skip_ws(after, end) == end)
            result = PyBytes_FromStringAndSize(out.data ? out.data : "", out.len);
        else {
            result = Py_None;
            Py_INCREF(result);
        }
    }
    PyMem_Free(out.data);
    return result;
}

/* One str per distinct schema or table name met last (a strong reference). */
static PyObject *cached_name(PyObject **cache, Span name) {
    if (*cache != NULL && PyUnicode_GET_LENGTH(*cache) == name.n && PyUnicode_IS_ASCII(*cache) &&
        memcmp(PyUnicode_DATA(*cache), name.p, name.n) == 0) {
        Py_INCREF(*cache);
        return *cache;
    }
    PyObject *text = PyUnicode_DecodeUTF8(name.p, name.n, NULL);
    if (text != NULL) {
        Py_XSETREF(*cache, text);
        Py_INCREF(text);
    }
    return text;
}

static int parse_hex(Span s, unsigned long long *out) {
    unsigned long long v = 0;
    if (s.n == 0 || s.n > 8)
        return -1;
    for (Py_ssize_t i = 0; i < s.n; i++) {
        char c = s.p[i];
        int d = (c >= '0' && c <= '9') ? c - '0' : (c >= 'A' && c <= 'F') ? c - 'A' + 10 : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
        if (d < 0)
            return -1;
        v = v << 4 | (unsigned)d;
    }
    *out = v;
    return 0;
}

static PyTypeObject *ConvertedType;

static PyStructSequence_Field converted_fields[] = {
    {"action", "I, U or D"},
    {"lsn", "the change's position"},
    {"schema", NULL},
    {"table", NULL},
    {"fields", "primary_key, before and after as COPY text fields, tab-separated"},
    {"ambiguous", "a float/numeric null that may be NaN or +-Infinity"},
    {NULL, NULL},
};

static PyStructSequence_Desc converted_desc = {"bemi_pg._fastrow.Converted", NULL, converted_fields, 6};
static PyObject *last_schema, *last_table;

static void release(ColList *list) {
    for (int i = 0; i < list->n; i++)
        Py_CLEAR(list->cols[i].converted);
}

/* The row's conversion: 1 with *row read, out holding its primary_key, before and after as COPY
 * fields, *lsn its position and *ambiguous set; 0 for a row this does not take; -1 with an error.
 * The caller releases the columns' references (release) and ctx->arena either way. */
/* What a change's hash needs of the row (lines, when it seals): the primary key's text and the
 * canonical text of before and after; ok is 0 where the canonical text is not sure. */
typedef struct {
    Buf pk, before, after;
    int has_key, ok;
} Hashed;

static int convert_row(Ctx *ctx, const char *data, Py_ssize_t n, Row *row, Col *columns, Col *identity, Buf *out,
                       unsigned long long *lsn, int *ambiguous, Hashed *hashed) {
    /* Begin, commit and message rows are the pure path's: only I, U and D are read further. */
    if (n < 14 || memcmp(data, "{\"action\":\"", 11) != 0 || (data[11] != 'I' && data[11] != 'U' && data[11] != 'D'))
        return 0;
    row->columns.cols = columns;
    row->identity.cols = identity;
    const char *end = read_object(data, data + n, row_member, row);
    if (end == NULL || skip_ws(end, data + n) != data + n || !row->action || !row->lsn.p || !row->schema.p || !row->table.p)
        return 0;
    for (int which = 0; which < 2; which++) {
        ColList *list = which ? &row->identity : &row->columns;
        for (int i = 0; i < list->n; i++) {
            int r = convert_value(ctx, &list->cols[i]);
            if (r < 0)
                return -1;
            if (r > 0)
                return 0;
        }
    }
    const char *slash = memchr(row->lsn.p, '/', row->lsn.n);
    unsigned long long high, low;
    if (slash == NULL || parse_hex((Span){row->lsn.p, slash - row->lsn.p}, &high) < 0 ||
        parse_hex((Span){slash + 1, row->lsn.n - (slash - row->lsn.p) - 1}, &low) < 0)
        return 0;
    /* An UPDATE that changed the key moved the row: the pure path records the key it left
     * (stitch.ChangeRow.moved_from, written to bemi.key_move), so such a row is its. The same
     * value has the same text in identity and columns, so the texts tell a change exactly. */
    if (row->action == 'U' && row->pk_count == 1 && row->pk_name.p != NULL) {
        Col *old_key = find(&row->identity, row->pk_name), *new_key = find(&row->columns, row->pk_name);
        if (old_key != NULL && new_key != NULL &&
            (old_key->value.n != new_key->value.n || memcmp(old_key->value.p, new_key->value.p, (size_t)old_key->value.n) != 0))
            return 0;
    }
    ColList *before_cols = &row->identity, *after_cols = &row->columns, empty = {NULL, 0, NULL};
    if (row->action == 'D' && row->identity.n == 0 && row->columns.n > 0) {
        before_cols = &row->columns;
        after_cols = &empty;
    }
    /* primary_key: the value's text (stitch._pk_text), when the row holds the key column */
    int has_key = 0;
    if (row->pk_count == 1 && row->pk_name.p != NULL) {
        ColList *source = row->action == 'D' ? before_cols : after_cols;
        if (find(source, row->pk_name) != NULL || (row->action == 'U' && row->identity.n > 0 && find(&row->identity, row->pk_name) != NULL)) {
            ColList *first = row->action == 'D' ? &row->identity : &row->columns;
            ColList *second = row->action == 'D' ? &row->columns : &row->identity;
            Col *key = find(first, row->pk_name);
            if (key == NULL && (key = find(second, row->pk_name)) == NULL)
                return 0;
            Span v = key->value;
            if (!(v.n == 4 && memcmp(v.p, "null", 4) == 0)) {
                has_key = 1;
                if (v.p[0] == '"') {
                    Buf text = {0};
                    int r = unescape(v, &text);
                    if (r == 0)
                        r = put_copy(out, text.data ? text.data : "", text.len);
                    if (r == 0 && hashed != NULL)
                        r = buf_put(&hashed->pk, text.data ? text.data : "", text.len);
                    PyMem_Free(text.data);
                    if (r < 0) {
                        if (PyErr_Occurred())
                            return -1;
                        return 0;
                    }
                } else if (put_copy(out, v.p, v.n) < 0 || (hashed != NULL && buf_put(&hashed->pk, v.p, v.n) < 0))
                    return -1;
            }
        }
    }
    if ((!has_key && buf_put(out, "\\N", 2) < 0) || buf_putc(out, '\t') < 0 ||
        object_json(out, before_cols, NULL, &ctx->arena) < 0 || buf_putc(out, '\t') < 0 ||
        object_json(out, after_cols, (row->action == 'U' && row->identity.n > 0) ? &row->identity : NULL, &ctx->arena) < 0)
        return -1;
    if (hashed != NULL) {
        hashed->has_key = has_key;
        int r = canon_columns(&hashed->before, before_cols, NULL, &ctx->arena);
        if (r > 0)
            r = canon_columns(&hashed->after, after_cols, (row->action == 'U' && row->identity.n > 0) ? &row->identity : NULL, &ctx->arena);
        if (r < 0)
            return -1;
        hashed->ok = r > 0;
    }
    *ambiguous = 0;
    for (int i = 0; i < row->columns.n; i++)
        *ambiguous |= row->columns.cols[i].ambiguous;
    for (int i = 0; i < row->identity.n; i++)
        *ambiguous |= row->identity.cols[i].ambiguous;
    *lsn = high << 32 | low;
    return 1;
}

static PyObject *convert(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Col columns[MAX_COLUMNS], identity[MAX_COLUMNS]; /* on the stack: plan() and value_json may release the GIL */
    if (nargs != 4 || !PyBytes_Check(args[3]) || !PyDict_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "convert(codes: dict, plan, value_json, data: bytes)");
        return NULL;
    }
    Row row = {0};
    PyObject *result = NULL;
    Ctx ctx = {args[0], args[1], args[2], {0}};
    Buf out = {0};
    unsigned long long lsn;
    int ambiguous;
    int taken = convert_row(&ctx, PyBytes_AS_STRING(args[3]), PyBytes_GET_SIZE(args[3]), &row, columns, identity, &out, &lsn, &ambiguous, NULL);
    if (taken < 0)
        goto fail;
    if (taken == 0)
        goto refuse;
    PyObject *items[6] = {
        PyUnicode_FromOrdinal((unsigned char)row.action), PyLong_FromUnsignedLongLong(lsn),
        cached_name(&last_schema, row.schema), cached_name(&last_table, row.table),
        PyBytes_FromStringAndSize(out.data, out.len), PyBool_FromLong(ambiguous),
    };
    result = PyStructSequence_New(ConvertedType);
    for (int i = 0; i < 6; i++) {
        if (items[i] == NULL || result == NULL) {
            Py_CLEAR(result);
            for (int j = 0; j < 6; j++)
                Py_XDECREF(items[j]);
            goto fail;
        }
    }
    for (int i = 0; i < 6; i++)
        PyStructSequence_SET_ITEM(result, i, items[i]);
    goto done;
refuse:
    result = Py_None;
    Py_INCREF(result);
    goto done;
fail:
    result = NULL;
done:
    release(&row.columns);
    release(&row.identity);
    PyMem_Free(ctx.arena.data);
    PyMem_Free(out.data);
    return result;
}

static const char *OPERATION_OF[] = {"CREATE", "UPDATE", "DELETE"};

static int put_decimal(Buf *b, unsigned long long v) {
    char digits[24], *p = digits + sizeof digits;
    do
        *--p = (char)('0' + v % 10);
    while ((v /= 10) != 0);
    return buf_put(b, p, digits + sizeof digits - p);
}

static int put_hex64(Buf *b, unsigned long long v) {
    static const char hexdigits[] = "0123456789abcdef";
    char digits[16];
    for (int i = 15; i >= 0; i--, v >>= 4)
        digits[i] = hexdigits[v & 15];
    return buf_put(b, digits, 16);
}

/* lines(codes, plan, value_json, rows, i, schema, table, prefix, seq, id_high, id_low, tail, out, limit, limit_bytes)
 * converts rows[i:] (bytes, or 1-tuples of bytes as fetchmany gives them) as long as they are
 * INSERT, UPDATE or DELETE rows of schema.table that convert takes, at most limit of them and
 * until the lines reach limit_bytes, and appends each one's whole COPY line to the bytearray out (stitch.ConvertedRow.copy_line's
 * bytes): prefix (the recorded schema and table fields and a tab), the operation, the fields,
 * the position, seq (counting up from seq), the id (id_high << 64 | id_low | seq << 26, as
 * stitch.change_id) and tail (the transaction's fields and the newline). Returns (the index of
 * the first row not taken, the next seq, whether one was ambiguous); the caller takes that row
 * the one-row way (convert, or the pure path). */
static int put_be32(Buf *b, uint32_t v) {
    char x[4] = {(char)(v >> 24), (char)(v >> 16), (char)(v >> 8), (char)v};
    return buf_put(b, x, 4);
}

static int put_be64(Buf *b, unsigned long long v) {
    return put_be32(b, (uint32_t)(v >> 32)) < 0 ? -1 : put_be32(b, (uint32_t)v);
}

/* A field of record_send's format: type OID, length, bytes (jsonb: its version byte first). */
static int put_field(Buf *b, uint32_t oid, const char *p, Py_ssize_t n, int jsonb) {
    if (put_be32(b, oid) < 0 || put_be32(b, (uint32_t)(n + jsonb)) < 0 || (jsonb && buf_putc(b, 1) < 0))
        return -1;
    return buf_put(b, p, n);
}

enum { OID_UUID = 2950, OID_TEXT = 25, OID_JSONB = 3802, OID_INT8 = 20, OID_INT4 = 23 };

/* One change's entry of the seal the poller supplies (bemi.seal_batch): its id's 16 bytes, then
 * sha256(record_send(ROW(id, source, database, schema, table, primary_key, operation, before,
 * after, context, committed_at, queued_at, created_at, transaction_id, position,
 * commit_position, seq))) (bemi.change_hash), or 32 zero bytes where the canonical text is not
 * sure. parts: the fields the run shares, record_send's bytes: after the id (source, database,
 * schema, table), after after (context, committed_at, queued_at, created_at, transaction_id),
 * after position (commit_position). */
static const char unsure[32] = {0};

static int seal_entry(Buf *seal, Buf *record, PyObject *sha256, Span parts[3], unsigned long long id_high,
                      unsigned long long id_low, Hashed *hashed, const char *operation, unsigned long long lsn,
                      unsigned long long seq) {
    if (put_be64(seal, id_high) < 0 || put_be64(seal, id_low) < 0)
        return -1;
    if (!hashed->ok)
        return buf_put(seal, unsure, 32);
    record->len = 0;
    if (put_be32(record, 17) < 0 || put_be32(record, OID_UUID) < 0 || put_be32(record, 16) < 0 ||
        buf_put(record, seal->data + seal->len - 16, 16) < 0 || buf_put(record, parts[0].p, parts[0].n) < 0)
        return -1;
    if (hashed->has_key ? put_field(record, OID_TEXT, hashed->pk.data ? hashed->pk.data : "", hashed->pk.len, 0) < 0
                        : (put_be32(record, OID_TEXT) < 0 || put_be32(record, 0xFFFFFFFFu) < 0))
        return -1;
    if (put_field(record, OID_TEXT, operation, 6, 0) < 0 || put_field(record, OID_JSONB, hashed->before.data, hashed->before.len, 1) < 0 ||
        put_field(record, OID_JSONB, hashed->after.data, hashed->after.len, 1) < 0 || buf_put(record, parts[1].p, parts[1].n) < 0 ||
        put_be32(record, OID_INT8) < 0 || put_be32(record, 8) < 0 || put_be64(record, lsn) < 0 ||
        buf_put(record, parts[2].p, parts[2].n) < 0 || put_be32(record, OID_INT4) < 0 || put_be32(record, 4) < 0 ||
        put_be32(record, (uint32_t)seq) < 0)
        return -1;
    PyObject *view = PyMemoryView_FromMemory(record->data, record->len, PyBUF_READ);
    PyObject *hash = view ? PyObject_CallOneArg(sha256, view) : NULL;
    Py_XDECREF(view);
    static PyObject *digest_name; /* "digest", interned once */
    if (digest_name == NULL && hash != NULL && (digest_name = PyUnicode_InternFromString("digest")) == NULL)
        Py_CLEAR(hash);
    PyObject *digest = hash ? PyObject_CallMethodNoArgs(hash, digest_name) : NULL;
    Py_XDECREF(hash);
    if (digest == NULL)
        return -1;
    int r = PyBytes_Check(digest) && PyBytes_GET_SIZE(digest) == 32 ? buf_put(seal, PyBytes_AS_STRING(digest), 32) : -1;
    if (r < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_TypeError, "sha256().digest() gave no 32 bytes");
    Py_DECREF(digest);
    return r;
}

static PyObject *lines(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Col columns[MAX_COLUMNS], identity[MAX_COLUMNS];
    if (nargs != 16 || !PyDict_Check(args[0]) || !PyList_Check(args[3]) || !PyUnicode_Check(args[5]) || !PyUnicode_Check(args[6]) ||
        !PyBytes_Check(args[7]) || !PyBytes_Check(args[11]) || !PyByteArray_Check(args[12])) {
        PyErr_SetString(PyExc_TypeError, "lines(codes: dict, plan, value_json, rows: list, i: int, schema: str, table: str, "
                                         "prefix: bytes, seq: int, id_high: int, id_low: int, tail: bytes, out: bytearray, limit: int, limit_bytes: int, "
                                         "sealing: (sha256, parts: (bytes, bytes, bytes), seal: bytearray) | None)");
        return NULL;
    }
    PyObject *sha256 = NULL, *seal_array = NULL;
    Span parts[3];
    if (args[15] != Py_None) {
        PyObject *sealing = args[15], *p;
        if (!PyTuple_Check(sealing) || PyTuple_GET_SIZE(sealing) != 3 || !PyTuple_Check(p = PyTuple_GET_ITEM(sealing, 1)) ||
            PyTuple_GET_SIZE(p) != 3 || !PyByteArray_Check(PyTuple_GET_ITEM(sealing, 2))) {
            PyErr_SetString(PyExc_TypeError, "lines: sealing is (sha256, (bytes, bytes, bytes), bytearray) or None");
            return NULL;
        }
        sha256 = PyTuple_GET_ITEM(sealing, 0);
        seal_array = PyTuple_GET_ITEM(sealing, 2);
        for (int k = 0; k < 3; k++) {
            PyObject *part = PyTuple_GET_ITEM(p, k);
            if (!PyBytes_Check(part)) {
                PyErr_SetString(PyExc_TypeError, "lines: sealing's parts are bytes");
                return NULL;
            }
            parts[k] = (Span){PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part)};
        }
    }
    PyObject *rows = args[3], *out_array = args[12];
    Py_ssize_t i = PyLong_AsSsize_t(args[4]), limit = PyLong_AsSsize_t(args[13]), limit_bytes = PyLong_AsSsize_t(args[14]);
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[8]);
    unsigned long long id_high = PyLong_AsUnsignedLongLong(args[9]), id_low = PyLong_AsUnsignedLongLong(args[10]);
    if (PyErr_Occurred())
        return NULL;
    Py_ssize_t schema_n, table_n;
    const char *schema = PyUnicode_AsUTF8AndSize(args[5], &schema_n), *table = PyUnicode_AsUTF8AndSize(args[6], &table_n);
    if (schema == NULL || table == NULL)
        return NULL;
    Span want_schema = {schema, schema_n}, want_table = {table, table_n};
    Span prefix = {PyBytes_AS_STRING(args[7]), PyBytes_GET_SIZE(args[7])}, tail = {PyBytes_AS_STRING(args[11]), PyBytes_GET_SIZE(args[11])};
    Buf out = {0}, fields = {0}, seal = {0}, record = {0};
    Hashed hashed = {{0}};
    int any_ambiguous = 0, failed = 0;
    Py_ssize_t start = i, count = PyList_GET_SIZE(rows);
    for (; i < count && i - start < limit && out.len < limit_bytes; i++) {
        PyObject *item = PyList_GET_ITEM(rows, i);
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 1)
            item = PyTuple_GET_ITEM(item, 0);
        if (!PyBytes_Check(item))
            break;
        Row row = {0};
        Ctx ctx = {args[0], args[1], args[2], {0}};
        unsigned long long lsn;
        int ambiguous;
        fields.len = hashed.pk.len = hashed.before.len = hashed.after.len = 0;
        int taken = convert_row(&ctx, PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item), &row, columns, identity, &fields, &lsn, &ambiguous,
                                sha256 ? &hashed : NULL);
        if (taken > 0 && !(span_eq(row.schema, want_schema) && span_eq(row.table, want_table)))
            taken = 0; /* another table's: the caller finds the name it is recorded under */
        if (taken > 0) {
            const char *operation = OPERATION_OF[row.action == 'I' ? 0 : row.action == 'U' ? 1 : 2];
            if (buf_put(&out, prefix.p, prefix.n) < 0 || buf_put(&out, operation, 6) < 0 || buf_putc(&out, '\t') < 0 ||
                buf_put(&out, fields.data, fields.len) < 0 || buf_putc(&out, '\t') < 0 || put_decimal(&out, lsn) < 0 ||
                buf_putc(&out, '\t') < 0 || put_decimal(&out, seq) < 0 || buf_putc(&out, '\t') < 0 ||
                put_hex64(&out, id_high) < 0 || put_hex64(&out, id_low | seq << 26) < 0 || buf_putc(&out, '\t') < 0 ||
                buf_put(&out, tail.p, tail.n) < 0 ||
                (sha256 && seal_entry(&seal, &record, sha256, parts, id_high, id_low | seq << 26, &hashed, operation, lsn, seq) < 0))
                taken = -1;
            seq++;
            any_ambiguous |= ambiguous;
        }
        release(&row.columns);
        release(&row.identity);
        PyMem_Free(ctx.arena.data);
        if (taken < 0)
            failed = 1;
        if (taken <= 0)
            break;
    }
    PyObject *result = NULL;
    if (!failed && (extend_bytearray(out_array, &out) < 0 || extend_bytearray(seal_array, &seal) < 0))
        failed = 1;
    if (!failed)
        result = Py_BuildValue("(nKO)", i, seq, any_ambiguous ? Py_True : Py_False);
    PyMem_Free(out.data);
    PyMem_Free(fields.data);
    PyMem_Free(seal.data);
    PyMem_Free(record.data);
    PyMem_Free(hashed.pk.data);
    PyMem_Free(hashed.before.data);
    PyMem_Free(hashed.after.data);
    return result;
}

static PyMethodDef methods[] = {
    {"convert", (PyCFunction)(void (*)(void))convert, METH_FASTCALL,
     "convert(codes, plan, value_json, data) -> Converted or None (see the module's source)"},
    {"lines", (PyCFunction)(void (*)(void))lines, METH_FASTCALL,
     "lines(codes, plan, value_json, rows, i, schema, table, prefix, seq, id_high, id_low, tail, out, limit, limit_bytes, sealing) -> (i, seq, ambiguous)"},
    {"canonical", (PyCFunction)canonical, METH_O, "canonical(text: bytes) -> jsonb's canonical text of it, or None (see the module's source)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "bemi_pg._fastrow", "Compiled conversion of wal2json change rows.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastrow(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    ConvertedType = PyStructSequence_NewType(&converted_desc);
    if (ConvertedType == NULL || PyModule_AddObjectRef(m, "Converted", (PyObject *)ConvertedType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
