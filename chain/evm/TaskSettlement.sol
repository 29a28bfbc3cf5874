// SPDX-License-Identifier: MIT
pragma solidity 0.8.30;

/// @title TaskSettlement: tasknet's settlement rules on an EVM chain.
/// @notice The same rules as chain/rules.py (its reference model; prose in docs/task-rounds.md
/// and docs/evm-settlement.md): the same transactions at the same slots are accepted, or
/// refused for the same reason (`Refused(code)`, code = index in chain.rules.REASON_CODES),
/// and leave the same state. A slot is `block.timestamp`; amounts are gwei (uint64).
/// @dev Built to scale: every operation is O(1) or O(k) (k = auditors per submission <= 64),
/// never a loop over a round's submitters. Storage per (task, round, account) is one slot, per
/// round two, per distribution attempt two, per (task, account) one; submissions and content
/// ids live only in events. Checks run in the order of chain/rules.py's handlers; a refusal
/// reverts everything, so a check may sit after a write that it would undo.
contract TaskSettlement {
    // ---------------------------------------------------------------- interface types

    struct Config {
        uint64 roundTime;
        uint64 submissionWindow;
        uint64 auditWindow;
        uint64 minStake;
        uint64 bountyPerRound;
        uint64 startSlot;
        uint8 allowedFailedDistributions;
        uint32 slashPpm;
        uint64 unstakeDelayRounds;
        uint8 maxAuditors;
        bytes32 codeHash;
    }

    /// A transaction the rules refuse; `reason` indexes chain.rules.REASON_CODES.
    error Refused(uint8 reason);
    /// A payout (claim, unstake) whose recipient did not accept the ether: nothing happened.
    error TransferFailed(address to, uint256 amountWei);

    bytes32 public constant SETTLEMENT_ID = keccak256("tasknet.TaskSettlement.v1");

    event TaskCreated(bytes32 indexed taskKey, string taskId, string name, address indexed owner, Config cfg);
    event Funded(bytes32 indexed taskKey, address indexed account, uint64 amount);
    event Staked(bytes32 indexed taskKey, address indexed account, uint64 amount);
    event Unstaked(bytes32 indexed taskKey, address indexed account, uint64 amount);
    event Submitted(bytes32 indexed taskKey, uint64 indexed round, address indexed account, string submission);
    event Audited(bytes32 indexed taskKey, uint64 indexed round, address indexed auditor, address[] invalid);
    event DistributionSubmitted(
        bytes32 indexed taskKey,
        uint64 indexed round,
        address indexed distributor,
        uint8 attempt,
        bytes32 root,
        uint64 total,
        string cid
    );
    event DistributionVoted(bytes32 indexed taskKey, uint64 indexed round, address indexed voter, uint8 attempt);
    event PaidOut(bytes32 indexed taskKey, uint64 indexed round, address indexed payer, uint8 attempt, uint64 total);
    event Claimed(bytes32 indexed taskKey, uint64 indexed round, address indexed account, uint64 amount);
    event Slashed(bytes32 indexed taskKey, uint64 indexed round, address indexed account, uint64 amount);
    event PeerBound(address indexed account, bytes peerId, bytes signature);

    // ---------------------------------------------------------------- refusal codes

    // 0 is bad_nonce: an EVM chain numbers transactions itself, the contract never refuses one
    uint8 internal constant INSUFFICIENT_BALANCE = 1;
    uint8 internal constant UNKNOWN_TASK = 2;
    uint8 internal constant TASK_EXISTS = 3;
    uint8 internal constant BAD_CONFIG = 4;
    uint8 internal constant NOT_STAKED = 5;
    uint8 internal constant OUTSIDE_WINDOW = 6;
    uint8 internal constant ALREADY_SUBMITTED = 7;
    uint8 internal constant TOO_LARGE = 8;
    uint8 internal constant NOT_AUDITOR = 9;
    uint8 internal constant ALREADY_VOTED = 10;
    uint8 internal constant NOT_DISTRIBUTOR = 11;
    uint8 internal constant DISTRIBUTION_EXISTS = 12;
    uint8 internal constant NO_DISTRIBUTION = 13;
    uint8 internal constant OVER_BOUNTY = 14;
    uint8 internal constant NOT_READY = 15;
    uint8 internal constant ALREADY_PAID = 16;
    uint8 internal constant BAD_PROOF = 17;
    uint8 internal constant ALREADY_CLAIMED = 18;
    uint8 internal constant SLASHED = 19;
    uint8 internal constant STAKE_LOCKED = 20;
    uint8 internal constant BAD_AMOUNT = 21;
    uint8 internal constant MALFORMED = 22;

    // ---------------------------------------------------------------- limits (as chain/rules.py)

    uint256 internal constant GWEI = 1e9;
    uint256 internal constant PPM = 1_000_000;
    uint256 internal constant MAX_TASK_ID_BYTES = 64;
    uint256 internal constant MAX_NAME_BYTES = 128;
    uint256 internal constant MAX_SUBMISSION_BYTES = 512;
    uint256 internal constant MAX_CID_BYTES = 256;
    uint256 internal constant MAX_PROOF_LENGTH = 64;
    uint256 internal constant MAX_AUDITORS_LIMIT = 64;
    uint256 internal constant MAX_FAILED_DISTRIBUTIONS_LIMIT = 64;
    uint256 internal constant MAX_PEER_ID_BYTES = 64;
    uint256 internal constant SIGNATURE_BYTES = 64;
    /// MAX_ROUND - 2 - MAX_FAILED_DISTRIBUTIONS_LIMIT: round r + 2 + attempt stays a round
    uint256 internal constant MAX_ROUND_FIELD = (2 ** 63 - 1) - 2 - 64;

    uint256 internal constant SUBMISSION = 0;
    uint256 internal constant AUDIT = 1;
    uint256 internal constant IDLE = 2;

    // ---------------------------------------------------------------- storage

    /// The round clock of a task: one slot.
    struct Clock {
        uint64 start;
        uint64 roundTime;
        uint64 submissionWindow;
        uint64 auditWindow;
    }

    /// The rest of a task's parameters the rules read: one slot.
    struct Params {
        uint64 minStake;
        uint64 bountyPerRound;
        uint64 unstakeDelayRounds;
        uint32 slashPpm;
        uint8 allowedFailedDistributions;
        uint8 maxAuditors;
    }

    /// A node in a task: one slot.
    struct Account {
        uint64 stake;
        uint64 pending; // the round of its last submission + 1 until settled, else 0
        uint64 lastSubmission; // the round its last submission was made in (r + 1 for work r), 0: never
    }

    /// A submitter of a round: one slot (zero for an account that did not submit).
    struct Entry {
        uint32 index; // its index in the round + 1
        uint32 votes; // auditors that voted against its submission
        bool audited; // it sent its audit for the round
        uint72 distributionVotes; // bit j: it voted against distribution attempt j
        bool claimed;
    }

    /// A round's counters: one slot.
    struct RoundState {
        uint32 n; // submitters
        uint32 rejected; // submitters with 2 * votes > k
        uint64 claimable;
        uint8 attempts; // the last attempt sent + 1 (attempts are sent in order; 0: none)
        uint8 accepted; // the accepted attempt + 1, set by the payout
        bool paid;
    }

    /// A distribution attempt: two slots.
    struct Attempt {
        bytes32 root;
        address distributor;
        uint64 total;
        uint32 votesAgainst;
    }

    struct Round {
        bytes32 seed; // the running audit seed
        RoundState state;
        mapping(address => Entry) entries;
        mapping(uint256 => Attempt) attempts;
    }

    struct Task {
        Clock clock;
        Params params;
        address owner;
        uint64 pool;
        bytes32 seed; // sha256("tasknet-audit" || u32be(len(taskId)) || taskId)
        bytes32 codeHash;
        mapping(address => Account) accounts;
        mapping(uint64 => Round) rounds;
    }

    struct Peer {
        bytes peerId;
        bytes32 signatureHead;
        bytes32 signatureTail;
    }

    mapping(bytes32 => Task) internal tasks;
    mapping(address => Peer) internal peers;
    uint64 internal slashedTotal;

    // ---------------------------------------------------------------- transactions

    function createTask(string calldata taskId, string calldata name, Config calldata cfg) external {
        uint256 idLength = bytes(taskId).length;
        if (
            idLength == 0 || idLength > MAX_TASK_ID_BYTES || !_isUtf8(bytes(taskId))
                || bytes(name).length > MAX_NAME_BYTES || !_isUtf8(bytes(name))
        ) revert Refused(BAD_CONFIG);
        if (
            cfg.roundTime == 0 || cfg.submissionWindow == 0 || cfg.auditWindow == 0 || cfg.minStake == 0
                || cfg.allowedFailedDistributions > MAX_FAILED_DISTRIBUTIONS_LIMIT || cfg.slashPpm > PPM
                || cfg.maxAuditors == 0 || cfg.maxAuditors > MAX_AUDITORS_LIMIT
                || uint256(cfg.submissionWindow) + cfg.auditWindow > cfg.roundTime
        ) revert Refused(BAD_CONFIG);
        bytes32 key = keccak256(bytes(taskId));
        Task storage t = tasks[key];
        if (t.clock.roundTime != 0) revert Refused(TASK_EXISTS);

        Config memory actual = cfg;
        if (actual.startSlot == 0) actual.startSlot = uint64(block.timestamp);
        t.clock = Clock(actual.startSlot, cfg.roundTime, cfg.submissionWindow, cfg.auditWindow);
        t.params = Params(
            cfg.minStake,
            cfg.bountyPerRound,
            cfg.unstakeDelayRounds,
            cfg.slashPpm,
            cfg.allowedFailedDistributions,
            cfg.maxAuditors
        );
        t.owner = msg.sender;
        t.seed = sha256(abi.encodePacked("tasknet-audit", uint32(idLength), taskId));
        t.codeHash = cfg.codeHash;
        emit TaskCreated(key, taskId, name, msg.sender, actual);
    }

    function fund(string calldata taskId) external payable {
        (bytes32 key, Task storage t) = _task(taskId);
        uint64 amount = _paidAmount();
        uint256 pool = uint256(t.pool) + amount;
        if (pool > type(uint64).max) revert Refused(BAD_AMOUNT);
        t.pool = uint64(pool);
        emit Funded(key, msg.sender, amount);
    }

    function stake(string calldata taskId) external payable {
        (bytes32 key, Task storage t) = _task(taskId);
        uint64 amount = _paidAmount();
        Account memory a = t.accounts[msg.sender];
        _settle(key, t, t.clock, msg.sender, a);
        uint256 staked = uint256(a.stake) + amount;
        if (staked > type(uint64).max) revert Refused(BAD_AMOUNT);
        a.stake = uint64(staked);
        t.accounts[msg.sender] = a;
        emit Staked(key, msg.sender, amount);
    }

    function unstake(string calldata taskId, uint64 amount) external {
        (bytes32 key, Task storage t) = _task(taskId);
        if (amount == 0) revert Refused(BAD_AMOUNT);
        Clock memory c = t.clock;
        Account memory a = t.accounts[msg.sender];
        if (a.lastSubmission != 0) {
            // the current round must be at least lastSubmission + unstakeDelayRounds
            if (
                block.timestamp < c.start
                    || (block.timestamp - c.start) / c.roundTime
                        < uint256(a.lastSubmission) + t.params.unstakeDelayRounds
            ) revert Refused(STAKE_LOCKED);
        }
        // the pending round p is stored as p + 1: its audits end with round p + 1's audit window
        if (a.pending != 0 && block.timestamp < _auditEnd(c, a.pending)) revert Refused(STAKE_LOCKED);
        _settle(key, t, c, msg.sender, a);
        if (amount > a.stake) revert Refused(INSUFFICIENT_BALANCE);
        unchecked {
            a.stake -= amount;
        }
        t.accounts[msg.sender] = a;
        emit Unstaked(key, msg.sender, amount);
        _pay(amount);
    }

    function submit(string calldata taskId, uint64 round, string calldata submission) external {
        (bytes32 key, Task storage t) = _task(taskId);
        _checkRound(round);
        _checkText(bytes(submission), MAX_SUBMISSION_BYTES);
        Clock memory c = t.clock;
        if (!_inWindow(c, uint256(round) + 1, SUBMISSION)) revert Refused(OUTSIDE_WINDOW);
        Account memory a = t.accounts[msg.sender];
        _settle(key, t, c, msg.sender, a); // the pending round is older: its audits are over
        if (a.stake < t.params.minStake) revert Refused(NOT_STAKED);
        Round storage rd = t.rounds[round];
        Entry storage e = rd.entries[msg.sender];
        if (e.index != 0) revert Refused(ALREADY_SUBMITTED);

        uint32 n = rd.state.n;
        bytes32 seed = n == 0 ? sha256(abi.encodePacked(t.seed, round)) : rd.seed;
        rd.seed = sha256(abi.encodePacked(seed, sha256(bytes(submission))));
        unchecked {
            // n < 2^32 - 1: four billion submissions do not fit in one submission window
            rd.state.n = n + 1;
            e.index = n + 1;
            a.pending = round + 1;
            a.lastSubmission = round + 1;
        }
        t.accounts[msg.sender] = a;
        emit Submitted(key, round, msg.sender, submission);
    }

    function audit(string calldata taskId, uint64 round, address[] calldata invalid) external {
        (bytes32 key, Task storage t) = _task(taskId);
        _checkRound(round);
        uint256 maxAuditors = t.params.maxAuditors;
        uint256 m = invalid.length;
        if (m > maxAuditors || _hasDuplicate(invalid)) revert Refused(MALFORMED);
        if (!_inWindow(t.clock, uint256(round) + 1, AUDIT)) revert Refused(OUTSIDE_WINDOW);
        Round storage rd = t.rounds[round];
        Entry storage me = rd.entries[msg.sender];
        uint256 myIndex = me.index;
        if (myIndex == 0) revert Refused(NOT_AUDITOR);
        if (me.audited) revert Refused(ALREADY_VOTED);
        me.audited = true;
        if (m != 0) _vote(rd, invalid, myIndex - 1, maxAuditors);
        emit Audited(key, round, msg.sender, invalid);
    }

    function submitDistribution(
        string calldata taskId,
        uint64 round,
        bytes32 root,
        uint64 total,
        string calldata cid
    ) external {
        (bytes32 key, Task storage t) = _task(taskId);
        _checkRound(round);
        _checkText(bytes(cid), MAX_CID_BYTES);
        Params memory p = t.params;
        uint256 attempt = _currentAttempt(t.clock, round, p.allowedFailedDistributions, SUBMISSION);
        Round storage rd = t.rounds[round];
        _checkDistributor(rd, attempt, p.maxAuditors);
        if (total > p.bountyPerRound) revert Refused(OVER_BOUNTY);
        if (total > t.pool) revert Refused(INSUFFICIENT_BALANCE);

        Attempt storage at = rd.attempts[attempt];
        at.root = root;
        at.distributor = msg.sender;
        at.total = total;
        rd.state.attempts = uint8(attempt + 1);
        emit DistributionSubmitted(key, round, msg.sender, uint8(attempt), root, total, cid);
    }

    function auditDistribution(string calldata taskId, uint64 round) external {
        (bytes32 key, Task storage t) = _task(taskId);
        _checkRound(round);
        Params memory p = t.params;
        uint256 attempt = _currentAttempt(t.clock, round, p.allowedFailedDistributions, AUDIT);
        Round storage rd = t.rounds[round];
        RoundState memory s = rd.state;
        if (s.attempts != attempt + 1) revert Refused(NO_DISTRIBUTION);
        Entry storage e = rd.entries[msg.sender];
        if (e.index == 0) revert Refused(NOT_AUDITOR);
        if (_isRejected(e.votes, s.n, p.maxAuditors)) revert Refused(SLASHED);
        Attempt storage at = rd.attempts[attempt];
        if (at.distributor == msg.sender) revert Refused(NOT_AUDITOR);
        uint72 voted = e.distributionVotes;
        uint72 bit = uint72(1 << attempt); // attempt <= 64
        if (voted & bit != 0) revert Refused(ALREADY_VOTED);
        e.distributionVotes = voted | bit;
        unchecked {
            at.votesAgainst += 1; // at most n - 1 < 2^32
        }
        emit DistributionVoted(key, round, msg.sender, uint8(attempt));
    }

    function payout(string calldata taskId, uint64 round) external {
        (bytes32 key, Task storage t) = _task(taskId);
        _checkRound(round);
        Round storage rd = t.rounds[round];
        RoundState memory s = rd.state;
        if (s.n == 0) revert Refused(NO_DISTRIBUTION);
        if (s.paid) revert Refused(ALREADY_PAID);
        // Only the last attempt sent can be pending or accepted: every earlier one was found
        // rejected when the next was sent.
        if (s.attempts == 0) revert Refused(NO_DISTRIBUTION);
        uint256 j = s.attempts - 1;
        if (block.timestamp < _auditEnd(t.clock, uint256(round) + 2 + j)) revert Refused(NOT_READY);
        Attempt storage at = rd.attempts[j];
        if (_listRejected(at.votesAgainst, s)) revert Refused(NO_DISTRIBUTION);
        uint64 total = at.total;
        uint64 pool = t.pool;
        if (total > pool) revert Refused(INSUFFICIENT_BALANCE);
        unchecked {
            t.pool = pool - total;
        }
        s.claimable = total;
        s.paid = true;
        s.accepted = uint8(j + 1);
        rd.state = s;
        emit PaidOut(key, round, msg.sender, uint8(j), total);
    }

    function claim(string calldata taskId, uint64 round, uint64 amount, bytes32[] calldata proof) external {
        (bytes32 key, Task storage t) = _task(taskId);
        _checkRound(round);
        if (amount == 0) revert Refused(BAD_AMOUNT);
        if (proof.length > MAX_PROOF_LENGTH) revert Refused(MALFORMED);
        Round storage rd = t.rounds[round];
        RoundState memory s = rd.state;
        if (s.n == 0) revert Refused(NO_DISTRIBUTION);
        if (!s.paid) revert Refused(NOT_READY);
        Entry storage e = rd.entries[msg.sender];
        if (e.index == 0) revert Refused(BAD_PROOF);
        if (_isRejected(e.votes, s.n, t.params.maxAuditors)) revert Refused(SLASHED);
        if (e.claimed) revert Refused(ALREADY_CLAIMED);
        if (!_verify(proof, rd.attempts[s.accepted - 1].root, leafOf(msg.sender, amount))) {
            revert Refused(BAD_PROOF);
        }
        if (amount > s.claimable) revert Refused(OVER_BOUNTY);
        unchecked {
            rd.state.claimable = s.claimable - amount;
        }
        e.claimed = true;
        emit Claimed(key, round, msg.sender, amount);
        _pay(amount);
    }

    function bindPeer(bytes calldata peerId, bytes calldata signature) external {
        if (peerId.length == 0 || peerId.length > MAX_PEER_ID_BYTES || signature.length != SIGNATURE_BYTES) {
            revert Refused(MALFORMED);
        }
        Peer storage peer = peers[msg.sender];
        peer.peerId = peerId;
        peer.signatureHead = bytes32(signature[:32]);
        peer.signatureTail = bytes32(signature[32:]);
        emit PeerBound(msg.sender, peerId, signature);
    }

    // ---------------------------------------------------------------- pure functions

    /// The position of index i among n under the permutation keyed by `key`: a 4-round Feistel
    /// network on the smallest even bit width b >= 2 with 2^b >= n, cycle-walking until below n
    /// (docs/evm-settlement.md). Refused(malformed) unless 0 <= i < n <= 2^64.
    function prp(bytes32 key, uint256 n, uint256 i) external pure returns (uint256) {
        if (i >= n || n > 2 ** 64) revert Refused(MALFORMED);
        return _pure(_prp)(key, n, i);
    }

    /// OpenZeppelin's standard Merkle leaf of (account, amount).
    function leafOf(address account, uint256 amount) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(account, amount))));
    }

    /// Whether `leaf` is in the sorted-pair Merkle tree of `root`; root 0 never verifies.
    function verifyProof(bytes32[] calldata proof, bytes32 root, bytes32 leaf) external pure returns (bool) {
        return _verify(proof, root, leaf);
    }

    // ---------------------------------------------------------------- views

    function taskExists(string calldata taskId) external view returns (bool) {
        return tasks[keccak256(bytes(taskId))].clock.roundTime != 0;
    }

    /// The stake of `account` in the task as stored (a pending slash is taken when the account
    /// next acts); 0 for an unknown task.
    function stakeOf(string calldata taskId, address account) external view returns (uint64) {
        return tasks[keccak256(bytes(taskId))].accounts[account].stake;
    }

    /// The task's bounty pool; 0 for an unknown task.
    function poolOf(string calldata taskId) external view returns (uint64) {
        return tasks[keccak256(bytes(taskId))].pool;
    }

    function slashedPool() external view returns (uint64) {
        return slashedTotal;
    }

    function peerOf(address account) external view returns (bytes memory peerId, bytes memory signature) {
        Peer storage peer = peers[account];
        peerId = peer.peerId;
        if (peerId.length != 0) signature = abi.encodePacked(peer.signatureHead, peer.signatureTail);
    }

    /// The task's configuration (startSlot as set), owner, pool and task seed.
    function taskInfo(string calldata taskId)
        external
        view
        returns (Config memory cfg, address owner, uint64 pool, bytes32 taskSeed)
    {
        (, Task storage t) = _task(taskId);
        Clock memory c = t.clock;
        Params memory p = t.params;
        cfg = Config(
            c.roundTime,
            c.submissionWindow,
            c.auditWindow,
            p.minStake,
            p.bountyPerRound,
            c.start,
            p.allowedFailedDistributions,
            p.slashPpm,
            p.unstakeDelayRounds,
            p.maxAuditors,
            t.codeHash
        );
        return (cfg, t.owner, t.pool, t.seed);
    }

    /// An account in a task: its stake, its pending (unsettled) round if any, and the round its
    /// last submission was made in (r + 1 for work r; 0: never submitted).
    function accountInfo(string calldata taskId, address account)
        external
        view
        returns (uint64 staked, bool hasPending, uint64 pendingRound, uint64 lastSubmissionRound)
    {
        (, Task storage t) = _task(taskId);
        Account memory a = t.accounts[account];
        hasPending = a.pending != 0;
        return (a.stake, hasPending, hasPending ? a.pending - 1 : 0, a.lastSubmission);
    }

    /// The work of round r: its seed (final after the submission window), submitter count n,
    /// rejected count, attempts sent (the last attempt + 1), payout state.
    function roundInfo(string calldata taskId, uint64 round)
        external
        view
        returns (
            bytes32 seed,
            uint32 n,
            uint32 rejected,
            uint8 attemptsSent,
            bool paid,
            uint8 acceptedAttempt,
            uint64 claimable
        )
    {
        (, Task storage t) = _task(taskId);
        Round storage rd = t.rounds[round];
        RoundState memory s = rd.state;
        return (rd.seed, s.n, s.rejected, s.attempts, s.paid, s.paid ? s.accepted - 1 : 0, s.claimable);
    }

    /// An account in round r: whether it submitted, its index, votes against it, whether it
    /// audited, its distribution votes (bit j: attempt j) and whether it claimed.
    function entryOf(string calldata taskId, uint64 round, address account)
        external
        view
        returns (bool submitted, uint32 index, uint32 votes, bool audited, uint72 distributionVotes, bool claimed)
    {
        (, Task storage t) = _task(taskId);
        Entry memory e = t.rounds[round].entries[account];
        submitted = e.index != 0;
        return (submitted, submitted ? e.index - 1 : 0, e.votes, e.audited, e.distributionVotes, e.claimed);
    }

    function attemptOf(string calldata taskId, uint64 round, uint8 attempt)
        external
        view
        returns (address distributor, bytes32 root, uint64 total, uint32 votesAgainst)
    {
        (, Task storage t) = _task(taskId);
        Attempt memory at = t.rounds[round].attempts[attempt];
        return (at.distributor, at.root, at.total, at.votesAgainst);
    }

    // ---------------------------------------------------------------- internals

    function _task(string calldata taskId) internal view returns (bytes32 key, Task storage t) {
        uint256 length = bytes(taskId).length;
        if (length == 0 || length > MAX_TASK_ID_BYTES || !_isUtf8(bytes(taskId))) revert Refused(MALFORMED);
        key = keccak256(bytes(taskId));
        t = tasks[key];
        if (t.clock.roundTime == 0) revert Refused(UNKNOWN_TASK);
    }

    /// A text field (submission, cid): malformed unless UTF-8, then too_large over `maxBytes`.
    function _checkText(bytes calldata text, uint256 maxBytes) internal pure {
        if (!_isUtf8(text)) revert Refused(MALFORMED);
        if (text.length > maxBytes) revert Refused(TOO_LARGE);
    }

    /// Whether `s` is well-formed UTF-8 (RFC 3629, as Python decodes it strictly: no overlong
    /// forms, no surrogates, nothing above U+10FFFF): what makes a Python str. ASCII is checked
    /// 32 bytes at a time.
    function _isUtf8(bytes calldata s) internal pure returns (bool ok) {
        assembly ("memory-safe") {
            let p := s.offset
            let end := add(p, s.length)
            let high := 0x8080808080808080808080808080808080808080808080808080808080808080
            ok := 1
            for {} lt(p, end) {} {
                let rem := sub(end, p)
                let word := calldataload(p)
                let top := high
                // fewer than 32 bytes left: only the first `rem` bytes of the word are ours
                if lt(rem, 32) { top := and(high, not(sub(shl(mul(8, sub(32, rem)), 1), 1))) }
                if iszero(and(word, top)) {
                    p := add(p, 32)
                    continue
                }
                let c := byte(0, word)
                if lt(c, 0x80) {
                    p := add(p, 1)
                    continue
                }
                let len := 0
                let lo := 0x80 // the range of the second byte
                let hi := 0xBF
                if and(gt(c, 0xC1), lt(c, 0xE0)) { len := 2 }
                if and(gt(c, 0xDF), lt(c, 0xF0)) {
                    len := 3
                    if eq(c, 0xE0) { lo := 0xA0 } // overlong
                    if eq(c, 0xED) { hi := 0x9F } // surrogates
                }
                if and(gt(c, 0xEF), lt(c, 0xF5)) {
                    len := 4
                    if eq(c, 0xF0) { lo := 0x90 } // overlong
                    if eq(c, 0xF4) { hi := 0x8F } // above U+10FFFF
                }
                let c1 := byte(1, word)
                if or(or(iszero(len), gt(len, rem)), or(lt(c1, lo), gt(c1, hi))) {
                    ok := 0
                    break
                }
                if and(gt(len, 2), iszero(eq(and(byte(2, word), 0xC0), 0x80))) {
                    ok := 0
                    break
                }
                if and(gt(len, 3), iszero(eq(and(byte(3, word), 0xC0), 0x80))) {
                    ok := 0
                    break
                }
                p := add(p, len)
            }
        }
    }

    function _checkRound(uint64 round) internal pure {
        if (round > MAX_ROUND_FIELD) revert Refused(MALFORMED);
    }

    /// msg.value as a whole, positive uint64 number of gwei.
    function _paidAmount() internal view returns (uint64) {
        uint256 value = msg.value;
        if (value == 0 || value % GWEI != 0 || value / GWEI > type(uint64).max) revert Refused(BAD_AMOUNT);
        return uint64(value / GWEI);
    }

    function _pay(uint64 amount) internal {
        uint256 amountWei = uint256(amount) * GWEI;
        (bool ok,) = payable(msg.sender).call{value: amountWei}("");
        if (!ok) revert TransferFailed(msg.sender, amountWei);
    }

    /// Whether now is in round `round`'s `window` (SUBMISSION or AUDIT).
    function _inWindow(Clock memory c, uint256 round, uint256 window) internal view returns (bool) {
        if (block.timestamp < c.start) return false;
        uint256 elapsed = block.timestamp - c.start;
        return elapsed / c.roundTime == round && _windowAt(c, elapsed % c.roundTime) == window;
    }

    function _windowAt(Clock memory c, uint256 offset) internal pure returns (uint256) {
        if (offset < c.submissionWindow) return SUBMISSION;
        if (offset < uint256(c.submissionWindow) + c.auditWindow) return AUDIT;
        return IDLE;
    }

    /// The distribution attempt of `round` whose `window` it is now; Refused(outside_window)
    /// unless now is that window of a round r + 2 + j with 0 <= j <= allowedFailed.
    function _currentAttempt(Clock memory c, uint256 round, uint256 allowedFailed, uint256 window)
        internal
        view
        returns (uint256 attempt)
    {
        if (block.timestamp < c.start) revert Refused(OUTSIDE_WINDOW);
        uint256 elapsed = block.timestamp - c.start;
        uint256 current = elapsed / c.roundTime;
        if (current < round + 2) revert Refused(OUTSIDE_WINDOW);
        attempt = current - round - 2;
        if (attempt > allowedFailed || _windowAt(c, elapsed % c.roundTime) != window) {
            revert Refused(OUTSIDE_WINDOW);
        }
    }

    /// The first slot after round r's audit window.
    function _auditEnd(Clock memory c, uint256 round) internal pure returns (uint256) {
        return uint256(c.start) + round * c.roundTime + c.submissionWindow + c.auditWindow;
    }

    /// k = min(maxAuditors, n - 1): the auditors of each submission.
    function _auditors(uint256 n, uint256 maxAuditors) internal pure returns (uint256) {
        if (n == 0) return 0;
        return n - 1 < maxAuditors ? n - 1 : maxAuditors;
    }

    function _isRejected(uint256 votes, uint256 n, uint256 maxAuditors) internal pure returns (bool) {
        return 2 * votes > _auditors(n, maxAuditors);
    }

    /// Whether a list with `votesAgainst` is rejected: 2 * votes > n - R - 1 voters.
    function _listRejected(uint256 votesAgainst, RoundState memory s) internal pure returns (bool) {
        return 2 * votesAgainst + s.rejected + 1 > s.n;
    }

    /// Settles `who`'s pending round if its audits are over: a rejected submission loses
    /// stake * slashPpm / 1e6 to the slashed pool (event Slashed, also for a cut of 0).
    /// Updates `a` in memory; the caller stores it.
    function _settle(bytes32 key, Task storage t, Clock memory c, address who, Account memory a) internal {
        uint256 pending = a.pending;
        if (pending == 0 || block.timestamp < _auditEnd(c, pending)) return;
        a.pending = 0;
        uint64 r = uint64(pending - 1);
        Round storage rd = t.rounds[r];
        uint256 votes = rd.entries[who].votes;
        if (votes == 0) return;
        Params memory p = t.params;
        if (!_isRejected(votes, rd.state.n, p.maxAuditors)) return;
        uint64 cut = uint64(uint256(a.stake) * p.slashPpm / PPM);
        unchecked {
            a.stake -= cut; // cut <= stake
        }
        slashedTotal += cut;
        emit Slashed(key, r, who, cut);
    }

    /// Whether `list` names an address twice, in O(m) expected: a 1024-bit filter over the
    /// addresses' low 10 bits (in scratch memory), and an exact scan of the entries before an
    /// address only when its bit is already set.
    function _hasDuplicate(address[] calldata list) internal pure returns (bool duplicate) {
        assembly ("memory-safe") {
            let filter := mload(0x40)
            mstore(filter, 0)
            mstore(add(filter, 0x20), 0)
            mstore(add(filter, 0x40), 0)
            mstore(add(filter, 0x60), 0)
            let base := list.offset
            for { let i := 0 } lt(i, list.length) { i := add(i, 1) } {
                let account := calldataload(add(base, shl(5, i)))
                let slot := add(filter, shl(5, and(shr(8, account), 3)))
                let bit := shl(and(account, 0xff), 1)
                let word := mload(slot)
                if and(word, bit) {
                    for { let j := 0 } lt(j, i) { j := add(j, 1) } {
                        if eq(calldataload(add(base, shl(5, j))), account) { duplicate := 1 }
                    }
                    if duplicate { break }
                }
                mstore(slot, or(word, bit))
            }
        }
    }

    /// Refuses the sender as the distributor of `attempt` unless: somebody submitted, the
    /// attempt was not sent, no earlier attempt was accepted, the sender is at distribution
    /// position attempt mod n and its submission was not rejected.
    function _checkDistributor(Round storage rd, uint256 attempt, uint256 maxAuditors) internal view {
        RoundState memory s = rd.state;
        if (s.n == 0) revert Refused(NOT_DISTRIBUTOR);
        if (s.attempts == attempt + 1) revert Refused(DISTRIBUTION_EXISTS);
        // An earlier attempt was sent in an earlier round, so its audit window is over; every
        // attempt before it was rejected when it was sent (else it would have been refused).
        if (s.attempts != 0 && !_listRejected(rd.attempts[s.attempts - 1].votesAgainst, s)) {
            revert Refused(DISTRIBUTION_EXISTS);
        }
        Entry memory e = rd.entries[msg.sender];
        if (e.index == 0) revert Refused(NOT_DISTRIBUTOR);
        bytes32 dseed = sha256(abi.encodePacked(rd.seed, "distribution"));
        if (_prp(dseed, s.n, e.index - 1) != attempt % s.n) revert Refused(NOT_DISTRIBUTOR);
        if (_isRejected(e.votes, s.n, maxAuditors)) revert Refused(SLASHED);
    }

    /// The votes of the auditor with index `auditorIndex` against `invalid`, each checked to be
    /// assigned to it: 1 <= (position(auditor) - position(target)) mod n <= k. Checks and votes
    /// run in one pass: a refused target reverts the votes before it.
    function _vote(Round storage rd, address[] calldata invalid, uint256 auditorIndex, uint256 maxAuditors) internal {
        uint256 n = rd.state.n;
        uint256 k = _auditors(n, maxAuditors);
        bytes32 seed = rd.seed;
        if (n <= 1) revert Refused(NOT_AUDITOR); // k = 0: nobody to audit
        (uint256 half, uint256 mask) = _feistelWidth(n);
        uint256 auditorPosition = _permute(seed, n, auditorIndex, half, mask);
        uint256 newlyRejected = 0;
        for (uint256 i = 0; i < invalid.length; ++i) {
            Entry storage target = rd.entries[invalid[i]];
            uint256 targetIndex = target.index;
            if (targetIndex == 0) revert Refused(NOT_AUDITOR);
            uint256 distance = (auditorPosition + n - _permute(seed, n, targetIndex - 1, half, mask)) % n;
            if (distance == 0 || distance > k) revert Refused(NOT_AUDITOR);
            uint256 votes = uint256(target.votes) + 1; // at most k <= 64
            target.votes = uint32(votes);
            if (2 * votes > k && 2 * (votes - 1) <= k) ++newlyRejected;
        }
        if (newlyRejected != 0) rd.state.rejected += uint32(newlyRejected);
    }

    /// prp (see the external function).
    function _prp(bytes32 key, uint256 n, uint256 i) internal view returns (uint256) {
        if (n <= 1) return 0;
        (uint256 half, uint256 mask) = _feistelWidth(n);
        return _permute(key, n, i, half, mask);
    }

    /// Half the smallest even bit width b >= 2 with 2^b >= n, and its mask.
    function _feistelWidth(uint256 n) internal pure returns (uint256 half, uint256 mask) {
        uint256 bits = 2;
        while ((uint256(1) << bits) < n) bits += 2;
        half = bits >> 1;
        mask = (uint256(1) << half) - 1;
    }

    /// The Feistel permutation of i (n >= 2), cycle-walking until below n. Round t maps
    /// (L, R) to (R, L xor F_t(R)), F_t(R) = uint256(sha256(key || u8(t) || u32be(R))) & mask;
    /// unrolled, the halves alternate roles instead of swapping. Each F is one call of the
    /// sha256 precompile on a message in scratch memory above the free memory pointer (the
    /// `sha256` builtin would copy it to fresh memory each time).
    function _permute(bytes32 key, uint256 n, uint256 i, uint256 half, uint256 mask)
        internal
        view
        returns (uint256 x)
    {
        assembly ("memory-safe") {
            let message := mload(0x40) // key || u8(t) || u32be(R): 37 bytes
            let tail := add(message, 0x20)
            let digest := add(message, 0x40)
            mstore(message, key)
            let ok := 1
            x := i
            for {} 1 {} {
                let l := shr(half, x)
                let r := and(x, mask)
                mstore(tail, shl(216, r)) // t = 0
                ok := and(ok, staticcall(gas(), 0x02, message, 37, digest, 0x20))
                l := xor(l, and(mload(digest), mask))
                mstore(tail, or(shl(248, 1), shl(216, l))) // t = 1
                ok := and(ok, staticcall(gas(), 0x02, message, 37, digest, 0x20))
                r := xor(r, and(mload(digest), mask))
                mstore(tail, or(shl(248, 2), shl(216, r))) // t = 2
                ok := and(ok, staticcall(gas(), 0x02, message, 37, digest, 0x20))
                l := xor(l, and(mload(digest), mask))
                mstore(tail, or(shl(248, 3), shl(216, l))) // t = 3
                ok := and(ok, staticcall(gas(), 0x02, message, 37, digest, 0x20))
                r := xor(r, and(mload(digest), mask))
                x := or(shl(half, l), r)
                if lt(x, n) { break }
            }
            if iszero(ok) { revert(0, 0) }
        }
    }

    /// `f` as a pure function. `_prp` reads nothing but the sha256 precompile, as the builtin
    /// `sha256` (allowed in pure functions) does; only its explicit staticcall makes the
    /// compiler call it view. One implementation serves the rules and the public `prp`.
    function _pure(function(bytes32, uint256, uint256) internal view returns (uint256) f)
        internal
        pure
        returns (function(bytes32, uint256, uint256) internal pure returns (uint256) g)
    {
        assembly {
            g := f
        }
    }

    function _verify(bytes32[] calldata proof, bytes32 root, bytes32 leaf) internal pure returns (bool) {
        if (root == bytes32(0)) return false;
        bytes32 node = leaf;
        for (uint256 i = 0; i < proof.length; ++i) {
            bytes32 sibling = proof[i];
            assembly ("memory-safe") {
                switch lt(sibling, node)
                case 0 {
                    mstore(0x00, node)
                    mstore(0x20, sibling)
                }
                default {
                    mstore(0x00, sibling)
                    mstore(0x20, node)
                }
                node := keccak256(0x00, 0x40)
            }
        }
        return node == root;
    }
}
