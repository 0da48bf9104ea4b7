-- load the day, then report it (split into two statements, as common.sql splits them)
INSERT INTO {{ params.table }} (day, n) VALUES (%(day)s, 1);
SELECT day, n FROM {{ params.table }} WHERE day = %(day)s ORDER BY day;
