-- READ COMMITTED transfer locking both rows first, in id order, in one statement:
-- the SQL that flask_txn.lock_rows(accounts, [a, b], mode="update") sends (scenario 4).
\set a random(1, :naccts)
\set off random(1, :naccts - 1)
\set b 1 + (:a - 1 + :off) % :naccts
\set amt random(1, 100)
BEGIN ISOLATION LEVEL READ COMMITTED;
SELECT id, balance FROM accounts WHERE id IN (:a, :b) ORDER BY id FOR UPDATE;
UPDATE accounts SET balance = balance - :amt WHERE id = :a;
UPDATE accounts SET balance = balance + :amt WHERE id = :b;
COMMIT;
