-- READ COMMITTED transfer, two UPDATEs in random order: cold (scenarios 2 and 5),
-- and hot, where two transfers in opposite directions deadlock (scenario 4).
\set a random(1, :naccts)
\set off random(1, :naccts - 1)
\set b 1 + (:a - 1 + :off) % :naccts
\set amt random(1, 100)
BEGIN ISOLATION LEVEL READ COMMITTED;
UPDATE accounts SET balance = balance - :amt WHERE id = :a;
UPDATE accounts SET balance = balance + :amt WHERE id = :b;
COMMIT;
