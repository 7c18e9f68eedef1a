-- Hot SERIALIZABLE transfer: two UPDATEs (scenarios 3 and 5).
\set a random(1, :naccts)
\set off random(1, :naccts - 1)
\set b 1 + (:a - 1 + :off) % :naccts
\set amt random(1, 100)
BEGIN ISOLATION LEVEL SERIALIZABLE;
UPDATE accounts SET balance = balance - :amt WHERE id = :a;
UPDATE accounts SET balance = balance + :amt WHERE id = :b;
COMMIT;
