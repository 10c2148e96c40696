package leaderread

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestEveryReadWaitsForABarrierSentAfterItArrived: reads that arrive while a barrier
// is on its way wait for the next one, which is sent after they arrived (so it is past
// every write acknowledged before them); many reads share few barriers.
func TestEveryReadWaitsForABarrierSentAfterItArrived(t *testing.T) {
	var mu sync.Mutex
	var sentAt []time.Time
	var n atomic.Uint64
	b := NewBarriers(func(ctx context.Context) (uint64, error) {
		mu.Lock()
		sentAt = append(sentAt, time.Now())
		mu.Unlock()
		time.Sleep(2 * time.Millisecond) // the write's round trip
		return n.Add(1), nil
	})
	const reads = 200
	var wg sync.WaitGroup
	errs := make(chan string, reads)
	for range reads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			arrived := time.Now()
			seq, err := b.Wait(context.Background())
			if err != nil {
				errs <- err.Error()
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if sent := sentAt[seq-1]; sent.Before(arrived) {
				errs <- "a read took barrier " + strconv.FormatUint(seq, 10) + ", sent before it arrived"
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Fatal(e)
	}
	if sends := n.Load(); sends >= reads/2 {
		t.Fatalf("%d barriers for %d concurrent reads: they are not shared", sends, reads)
	}
}
